"""Text generation from a CharRNN with carried recurrent state.

The prompt is fed once; after that each new token is one forward step of length 1
that carries the recurrent states on, so a token costs the same however long the
text grows. A batch of samples runs at once. Sampling: temperature, top-k, top-p
(nucleus), greedy, or beam search. The unknown token is never produced.

Tokens are what the vocabulary makes them (prepare.tokenizer): characters, words or BPE
pieces; `length` counts tokens. The prompt is encoded with the same vocabulary (a word
or character it lacks is fed as the unknown token, with a warning) and kept verbatim;
the continuation is decoded to follow it (word: punctuation re-attached; BPE: the
tokenizer's decoder).

    model, vocab, _ = load_model_from_checkpoint("data/finetune/<fp>/best")
    texts = generate(model, vocab, prompt="Homer: ", length=300, num_samples=4, top_p=0.9, seed=1)

`generate_refeed` is the naive baseline that re-feeds the last `window` characters from a
zero state for every new character; only the benchmark and the tests use it.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from model.network.rnn import CharRNN, select_states
from model.data.vocab import Vocab


def _prompt_ids(vocab: Vocab, prompt: str) -> np.ndarray:
    """The prompt's ids, (P,); warns about characters (or words) outside the vocabulary (fed as unknown)."""
    ids = vocab.encode(prompt)
    unknown = vocab.unknown_in(prompt)
    if unknown:
        what = ("characters", "".join(unknown)) if vocab.kind == "char" else ("words", " ".join(unknown))
        warnings.warn(f"prompt {what[0]} not in the vocabulary are fed as the unknown token: {what[1]!r}",
                      stacklevel=4)  # the caller of generate (through torch.no_grad's wrapper)
    return ids


def _first_ids(vocab: Vocab, n: int, greedy: bool, gen: torch.Generator, device) -> torch.Tensor:
    """For an empty prompt: n first characters drawn from the training frequencies (the most frequent if greedy)."""
    counts = torch.tensor([0.0, *(vocab.counts or [1.0] * (vocab.size - 1))], device=device)  # (V,), unk never
    if greedy:
        return counts.argmax().repeat(n)
    return torch.multinomial(counts.expand(n, -1), 1, generator=gen).squeeze(1)


def pick_next(logits: torch.Tensor, *, unk_id: int, temperature: float, top_k: int | None, top_p: float | None,
              greedy: bool, gen: torch.Generator | None) -> torch.Tensor:
    """Next ids (N,) from last-step logits (N, V); the unknown token is masked out."""
    logits = logits.float().clone()
    logits[:, unk_id] = -torch.inf
    if greedy:
        return logits.argmax(-1)
    logits /= temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (N, 1)
        logits[logits < kth] = -torch.inf
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (N, V)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        logits.scatter_(1, order, sorted_logits.masked_fill(drop_sorted, -torch.inf))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(1)


def _check_args(vocab_size: int, length: int, num_samples: int, temperature: float, top_k, top_p, beam_width) -> None:
    problems = [msg for bad, msg in [
        (length < 0, f"length must be >= 0, got {length}"),
        (num_samples < 1, f"num_samples must be >= 1, got {num_samples}"),
        (temperature < 0, f"temperature must be >= 0 (0 = greedy), got {temperature}"),
        (top_k is not None and top_k < 1, f"top_k must be >= 1, got {top_k}"),
        (top_p is not None and not 0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}"),
        (beam_width is not None and beam_width < num_samples, f"beam_width ({beam_width}) must be >= num_samples ({num_samples})"),
        (beam_width is not None and beam_width >= vocab_size, f"beam_width ({beam_width}) must be below the vocabulary size ({vocab_size})"),
    ] if bad]
    if problems:
        raise ValueError("; ".join(problems))


@torch.no_grad()
def generate(model: CharRNN, vocab: Vocab, *, prompt: str = "", length: int = 200, num_samples: int = 1,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
             beam_width: int | None = None, seed: int = 0, device=None) -> list[str]:
    """`num_samples` texts, each the prompt (verbatim) followed by `length` generated tokens (characters, words or BPE pieces).

    Runs on `device` (the model is moved there), by default the model's device.

    temperature 0 means greedy. With beam_width, returns the num_samples most likely
    continuations of the beam search, best first (temperature, top_k, top_p ignored).
    With an empty prompt the first token is drawn from the vocabulary's counts.
    """
    _check_args(vocab.size, length, num_samples, temperature, top_k, top_p, beam_width)
    greedy = greedy or temperature == 0
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval().to(device)
    try:
        gen = torch.Generator(device=device).manual_seed(seed)
        n = beam_width or num_samples
        ids = torch.from_numpy(_prompt_ids(vocab, prompt).astype(np.int64)).to(device)  # (P,)
        if length == 0:
            return [prompt] * num_samples
        if len(ids) == 0:  # the first character is generated from the counts, not the model
            first = _first_ids(vocab, n, greedy or beam_width is not None, gen, device)  # (n,)
            logits, states = model(first[:, None])  # (n, 1, V)
            out, length = [first], length - 1
        else:
            logits, states = model(ids.expand(n, -1))  # (n, P, V)
            out = []
        if beam_width is not None:
            tokens = _beam_search(model, logits[:, -1], states, length, vocab.unk_id)[:num_samples]  # (num_samples, L)
            tokens = torch.cat([t[:num_samples, None] for t in out] + [tokens], dim=1)
        else:
            for t in range(length):
                nxt = pick_next(logits[:, -1], unk_id=vocab.unk_id, temperature=temperature, top_k=top_k,
                                top_p=top_p, greedy=greedy, gen=gen)  # (n,)
                out.append(nxt)
                if t + 1 < length:
                    logits, states = model(nxt[:, None], states)  # (n, 1, V)
            tokens = torch.stack(out, dim=1)  # (n, length)
        return [prompt + vocab.decode(row, after=prompt) for row in tokens.cpu().numpy()]
    finally:
        model.train(was_training)


def _beam_search(model: CharRNN, logits: torch.Tensor, states, length: int, unk_id: int) -> torch.Tensor:
    """Token rows (W, length) of the W best beams, best first; logits (W, V) and states hold W equal rows."""
    width, vocab_size = logits.shape
    scores = torch.zeros(width, device=logits.device)  # (W,) summed log-probabilities
    scores[1:] = -torch.inf  # all beams start equal: expand only the first at step one
    tokens = torch.zeros(width, 0, dtype=torch.long, device=logits.device)  # (W, t)
    for t in range(length):
        logp = logits.float().log_softmax(-1)
        logp[:, unk_id] = -torch.inf
        scores, flat = (scores[:, None] + logp).flatten().topk(width)  # (W,)
        beam, token = flat // vocab_size, flat % vocab_size
        tokens = torch.cat([tokens[beam], token[:, None]], dim=1)
        if t + 1 < length:
            logits, states = model(token[:, None], select_states(states, beam))
            logits = logits[:, -1]
    return tokens


@torch.no_grad()
def generate_refeed(model: CharRNN, vocab: Vocab, *, prompt: str = "", length: int = 200, window: int | None = 100,
                    num_samples: int = 1, temperature: float = 1.0, greedy: bool = False, seed: int = 0,
                    device=None) -> list[str]:
    """The naive baseline: every new token re-feeds the last `window` tokens (None = all)
    from a zero state. Same outputs as `generate` when window is None; benchmark and tests only."""
    if not prompt:
        raise ValueError("generate_refeed needs a prompt")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval().to(device)
    try:
        gen = torch.Generator(device=device).manual_seed(seed)
        ids = torch.from_numpy(_prompt_ids(vocab, prompt).astype(np.int64)).to(device).expand(num_samples, -1)  # (N, P)
        prompt_len = ids.shape[1]
        for _ in range(length):
            logits, _ = model(ids if window is None else ids[:, -window:])  # (N, <=window, V)
            nxt = pick_next(logits[:, -1], unk_id=vocab.unk_id, temperature=temperature, top_k=None, top_p=None,
                            greedy=greedy or temperature == 0, gen=gen)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        return [prompt + vocab.decode(row, after=prompt) for row in ids[:, prompt_len:].cpu().numpy()]
    finally:
        model.train(was_training)
