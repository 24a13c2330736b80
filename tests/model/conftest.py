"""Shared fixtures for the model tests: a tiny vocabulary, tiny shards and a tiny network config."""

from types import SimpleNamespace

import numpy as np
import pytest

from model.network.rnn import ModelConfig
from model.data.prepare import windows_of
from model.data.shards import ShardWriter
from model.data.vocab import build_vocab, count_chars

TEXT = "D'oh! Mmm... donuts. Woo-hoo! Why you little...! "


def _write_shards(shards_dir, vocab, train_text: str, val_text: str, seq_len: int = 16, rows_per_shard: int = 64):
    for split, text in (("train", train_text), ("val", val_text), ("test", val_text)):
        with ShardWriter(shards_dir, split, seq_len=seq_len, corpus="test", vocab_fingerprint=vocab.fingerprint,
                         rows_per_shard=rows_per_shard) as w:
            ids = vocab.encode(text)
            windows, _, overlap = windows_of(ids, np.array([len(ids)]), seq_len)  # one document
            w.add(windows, overlap)
    return shards_dir


@pytest.fixture
def write_shards():
    """write_shards(dir, vocab, train_text, val_text, seq_len=16, rows_per_shard=64) -> dir"""
    return _write_shards


@pytest.fixture
def tiny_model_config() -> ModelConfig:
    return ModelConfig(embedding_dim=16, hidden_sizes=[32], dropout=0.1)


@pytest.fixture
def corpus(tmp_path) -> SimpleNamespace:
    """A repetitive corpus: vocab, shards dir with ~45 train and ~9 val windows of 16 chars."""
    vocab = build_vocab(count_chars([TEXT]))
    shards = _write_shards(tmp_path / "shards", vocab, TEXT * 15, TEXT * 3)
    return SimpleNamespace(vocab=vocab, shards=shards, text=TEXT)
