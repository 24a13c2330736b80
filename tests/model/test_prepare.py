"""Corpora, document split, windows and shards that decode back to the text."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from model.data.prepare import (
    PrepareConfig,
    PrepareError,
    corpus_char_counts,
    decode_shards,
    group_lines,
    split_of,
    windows_of,
    write_corpus,
    write_shards,
)
from model.data.shards import read_overlap, read_split
from model.training.loop import scored_chars
from model.data.vocab import build_vocab


def test_windows_cover_each_document_and_skip_short_ones():
    ids = np.arange(30, dtype=np.uint16)
    lengths = np.array([12, 3, 15])  # doc 2 starts at 15
    w, doc_of, overlap = windows_of(ids, lengths, seq_len=5)
    assert doc_of.tolist() == [0, 0, 0, 2, 2, 2]
    # the 12-char document's last window starts at 6: its targets 7-10 were the window before's (6-10)
    assert overlap.tolist() == [0, 0, 4, 0, 0, 1]
    assert w.shape == (3 + 3, 6)
    assert w[0].tolist() == [0, 1, 2, 3, 4, 5] and w[1].tolist() == [5, 6, 7, 8, 9, 10]
    assert w[2].tolist() == [6, 7, 8, 9, 10, 11]  # aligned to the end of the 12-char document
    assert w[3].tolist() == [15, 16, 17, 18, 19, 20] and w[5].tolist() == [24, 25, 26, 27, 28, 29]
    assert windows_of(ids, np.array([3, 4]), seq_len=5)[0].shape == (0, 6)


def test_group_lines():
    docs = list(group_lines(iter(["a", "b", "c"]), 2, "s"))
    assert docs == [("s-00000", "a\nb"), ("s-00001", "c")]


def test_split_is_by_document_and_stable():
    ids = [f"d{i}" for i in range(2000)]
    split = split_of(ids, 0.1, 0.1, "homer")
    assert 0.07 < (split == 1).mean() < 0.13 and 0.07 < (split == 2).mean() < 0.13
    assert np.array_equal(split[:100], split_of(ids[:100], 0.1, 0.1, "homer"))
    assert not np.array_equal(split, split_of(ids, 0.1, 0.1, "other"))
    # the validation documents do not depend on the test fraction
    assert np.array_equal(split == 1, split_of(ids, 0.1, 0.3, "homer") == 1)


def test_fractions_must_leave_documents_to_train_on():
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction"):
        PrepareConfig(val_fraction=0.5, test_fraction=0.5)


def _corpus(tmp_path, n_docs=60):
    rng = np.random.default_rng(1)
    words = ["doughnut", "beer", "Marge", "D'oh!", "Mmm…", "plant", "Moe", "woo-hoo"]
    docs = [(f"doc{i}", " ".join(rng.choice(words, size=int(rng.integers(5, 60))))) for i in range(n_docs)]
    path = tmp_path / "corpus.parquet"
    write_corpus(iter(docs), path, batch_rows=7)
    return docs, path


def test_shards_decode_back_to_the_corpus_text(tmp_path):
    docs, path = _corpus(tmp_path)
    vocab = build_vocab(corpus_char_counts(path))
    cfg = PrepareConfig(seq_len=16, val_fraction=0.2, test_fraction=0.2, rows_per_shard=13)
    stats = write_shards(path, vocab, tmp_path / "shards", "toy", cfg)
    assert stats["oov_rate"] == 0.0 and stats["train"]["shards"] > 1
    assignment = split_of([d for d, _ in docs], cfg.val_fraction, cfg.test_fraction, cfg.split_salt)
    for index, split in enumerate(("train", "val", "test")):
        mask = assignment == index
        windows, meta = read_split(tmp_path / "shards", split)
        assert meta["vocab_fingerprint"] == vocab.fingerprint and meta["corpus"] == "toy"
        texts = [t for (_, t), m in zip(docs, mask) if m]
        decoded = decode_shards(windows, [len(t) for t in texts], vocab, cfg.seq_len)
        assert decoded == [t for t in texts if len(t) > cfg.seq_len]
        assert stats[split]["windows"] == len(windows)
        # each character of a kept document is scored once: every one but the document's first
        overlap = read_overlap(tmp_path / "shards", split)
        assert scored_chars(windows, overlap) == stats[split]["scored_chars"] == sum(len(t) - 1 for t in texts if len(t) > cfg.seq_len)
    assert pq.read_table(path).column_names == ["doc_id", "text"]


def test_seq_len_larger_than_every_document(tmp_path):
    docs, path = _corpus(tmp_path, n_docs=20)
    vocab = build_vocab(corpus_char_counts(path))
    with pytest.raises(PrepareError, match=r"prepare.seq_len=5000.*longest has \d+"):
        write_shards(path, vocab, tmp_path / "shards", "toy", PrepareConfig(seq_len=5000))
    assert not list((tmp_path / "shards").glob("*.parquet"))


def test_oov_rate_counts_characters_outside_the_vocabulary(tmp_path):
    docs, path = _corpus(tmp_path)
    vocab = build_vocab(corpus_char_counts(path), min_count=400)  # only the most common chars survive
    stats = write_shards(path, vocab, tmp_path / "shards", "toy", PrepareConfig(seq_len=8, val_fraction=0.3))
    assert 0 < stats["oov_rate"] < 1
