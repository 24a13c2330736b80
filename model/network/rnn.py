"""The character-level recurrent network: Embedding -> [Dropout -> GRU/LSTM] x n -> Linear.

One forward serves training and generation: it takes the recurrent states of the
previous call and returns the new ones, so generation feeds one character per step.

    cfg = ModelConfig()                          # the published recipe (~9.3M params at V=128)
    model = build_model(cfg, vocab.size)
    logits, states = model(ids)                  # ids (B, T) long -> logits (B, T, V)
    logits, states = model(next_ids, states)     # carry the state on
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from model.network.config import ModelConfig  # noqa: F401 (defined there, torch-free; imported from here too)

# One entry per layer: GRU h (1, B, H); LSTM (h, c), each (1, B, H).
State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class CharRNN(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cfg.cell]
        widths = [cfg.embedding_dim, *cfg.hidden_sizes]
        self.embedding = nn.Embedding(vocab_size, cfg.embedding_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.rnns = nn.ModuleList(rnn(i, h, batch_first=True) for i, h in zip(widths, widths[1:]))
        self.head = nn.Linear(widths[-1], vocab_size)

    def forward(self, ids: torch.Tensor, states: list[State] | None = None) -> tuple[torch.Tensor, list[State]]:
        x = self.embedding(ids)  # (B, T, E)
        new_states = []
        for i, rnn in enumerate(self.rnns):
            x, s = rnn(self.dropout(x), None if states is None else states[i])  # (B, T, H_i)
            new_states.append(s)
        return self.head(x), new_states  # (B, T, V)


def select_states(states: list[State], index: torch.Tensor) -> list[State]:
    """Pick batch rows of every layer's state (beam search reorders beams with this)."""
    pick = lambda t: t.index_select(1, index)  # noqa: E731  (1, B, H) -> (1, len(index), H)
    return [tuple(map(pick, s)) if isinstance(s, tuple) else pick(s) for s in states]


def build_model(cfg: ModelConfig, vocab_size: int) -> CharRNN:
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    return CharRNN(cfg, vocab_size)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
