"""Corpora, vocabulary and sequence shards: the body of the `prepare` stage.

Articles become one document each; the character's lines are grouped into documents
of consecutive lines, so a training window may span several short lines. Documents
are split into train, validation and test by a hash of their id (never by window),
encoded with numpy lookup tables, cut into windows of seq_len + 1 ids with stride
seq_len (the last window of a document is aligned to its end, so no character is lost;
its `overlap` says how many of its targets the window before already holds, so an
evaluation scores each character once), and written one shard at a time.

Validation chooses `best/` and early stopping; test is read only by the report.

    python -m model.data.prepare CORPUS.parquet VOCAB.json OUT_DIR --seq-len 100
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.data.shards import DEFAULT_ROWS_PER_SHARD, ShardWriter
from model.data.vocab import Vocab, count_chars

CORPUS_SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string())])
SPLITS = ("train", "val", "test")  # test: never read in training, never chooses a model
READ_BATCH_ROWS = 512  # documents per batch: big enough to vectorise, small enough to stay in cache


class PrepareError(ValueError):
    """The corpora cannot be turned into shards as configured."""


class PrepareConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seq_len: int = Field(100, ge=1, le=100_000, description="characters per training sequence (windows hold seq_len + 1 ids)")
    val_fraction: float = Field(0.1, gt=0, lt=1, allow_inf_nan=False, description="fraction of documents (by id hash) held out for validation: chooses best/ and early stopping")
    test_fraction: float = Field(0.1, gt=0, lt=1, allow_inf_nan=False, description="fraction of documents (by id hash) held out for the report's test figures; never read in training")
    min_count: int = Field(1, ge=1, description="keep characters seen at least this many times; rarer ones become the unknown token")
    lines_per_doc: int = Field(20, ge=1, description="consecutive lines of the character grouped into one document")
    rows_per_shard: int = Field(DEFAULT_ROWS_PER_SHARD, ge=1, description="windows per Parquet shard (bounds memory while writing)")
    split_salt: str = Field("homer", description="salt of the document hash that assigns train/val/test; change it for another split")

    @model_validator(mode="after")
    def _room_to_train(self) -> "PrepareConfig":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction is {self.val_fraction + self.test_fraction:g}; "
                             f"it must stay below 1 so that documents are left to train on")
        return self


# ---------------------------------------------------------------------------- corpora


def write_corpus(docs: Iterator[tuple[str, str]], path: Path, batch_rows: int = READ_BATCH_ROWS) -> dict:
    """Write (doc_id, text) pairs to Parquet in bounded batches; return counts."""
    docs_n = chars = 0
    with pq.ParquetWriter(path, CORPUS_SCHEMA, compression="zstd") as writer:
        batch: list[tuple[str, str]] = []
        for doc in docs:
            batch.append(doc)
            docs_n += 1
            chars += len(doc[1])
            if len(batch) >= batch_rows:
                writer.write_table(_corpus_table(batch))
                batch = []
        if batch:
            writer.write_table(_corpus_table(batch))
    return {"documents": docs_n, "chars": chars}


def _corpus_table(batch: list[tuple[str, str]]) -> pa.Table:
    ids, texts = zip(*batch)
    return pa.Table.from_arrays([pa.array(ids, pa.string()), pa.array(texts, pa.string())], schema=CORPUS_SCHEMA)


def group_lines(lines: Iterator[str], lines_per_doc: int, prefix: str) -> Iterator[tuple[str, str]]:
    """Consecutive lines joined by newlines, `lines_per_doc` at a time."""
    group: list[str] = []
    index = 0
    for line in lines:
        group.append(line)
        if len(group) == lines_per_doc:
            yield f"{prefix}-{index:05d}", "\n".join(group)
            group, index = [], index + 1
    if group:
        yield f"{prefix}-{index:05d}", "\n".join(group)


def iter_corpus(path: Path, batch_rows: int = READ_BATCH_ROWS) -> Iterator[tuple[list[str], list[str]]]:
    """Batches of (doc_ids, texts) from a corpus Parquet file."""
    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=["doc_id", "text"]):
        yield batch.column(0).to_pylist(), batch.column(1).to_pylist()


def corpus_char_counts(path: Path) -> Counter:
    counts: Counter = Counter()
    for _, texts in iter_corpus(path):
        counts.update(count_chars(["".join(texts)]))
    return counts


# ---------------------------------------------------------------------------- windows


def split_of(doc_ids: list[str], val_fraction: float, test_fraction: float, salt: str) -> np.ndarray:
    """(D,) index into SPLITS (0 train, 1 val, 2 test): a document's split is a function of its id alone.

    A document's hash u in [0, 1) puts it in val below val_fraction and in test below
    val_fraction + test_fraction, so the val documents do not depend on test_fraction.
    """
    hashes = np.array([int.from_bytes(hashlib.blake2b(f"{salt}:{d}".encode(), digest_size=4).digest(), "big") for d in doc_ids],
                      dtype=np.uint64)
    val_limit, test_limit = int(val_fraction * 2**32), int((val_fraction + test_fraction) * 2**32)
    return np.where(hashes < val_limit, 1, np.where(hashes < test_limit, 2, 0)).astype(np.int8)


def window_starts(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each window begins in the concatenated ids, its document, and its overlap.

    lengths: (D,) document lengths. Returns (W,) starts, (W,) doc_of and (W,) overlap.
    Windows hold seq_len + 1 ids with stride seq_len inside a document; a document's last
    window ends at its last character (overlapping the one before when the length is not
    a multiple of seq_len), and `overlap` counts its leading targets that the window
    before already holds (0 for every other window); documents shorter than seq_len + 1
    give no window.
    """
    width = seq_len + 1
    n_windows = np.where(lengths >= width, -(-(lengths - 1) // seq_len), 0)  # (D,) ceil((L-1)/seq_len)
    doc_of = np.repeat(np.arange(len(lengths)), n_windows)  # (W,)
    k = np.arange(len(doc_of)) - np.repeat(np.cumsum(n_windows) - n_windows, n_windows)  # window index in its document
    offset = np.minimum(k * seq_len, lengths[doc_of] - width)  # (W,) the last window aligned to the end
    return (np.cumsum(lengths) - lengths)[doc_of] + offset, doc_of, k * seq_len - offset


def gather_windows(ids: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
    """(W, seq_len + 1) windows of ids beginning at starts: one gather from a strided view."""
    if len(ids) < seq_len + 1:
        return np.zeros((0, seq_len + 1), dtype=ids.dtype)
    return np.lib.stride_tricks.sliding_window_view(ids, seq_len + 1)[starts]


def windows_of(ids: np.ndarray, lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows (W, seq_len + 1) of the documents, their document index (W,) and overlap (W,)."""
    starts, doc_of, overlap = window_starts(lengths, seq_len)
    return gather_windows(ids, starts, seq_len), doc_of, overlap


def encode_batch(vocab: Vocab, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(N,) ids of the texts concatenated, and (D,) their lengths in characters."""
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    return vocab.encode("".join(texts)), lengths


def write_shards(corpus_path: Path, vocab: Vocab, out_dir: Path, corpus: str, cfg: PrepareConfig) -> dict:
    """Encode one corpus into train/val/test shards under out_dir; return counts per split.

    `scored_chars` is what an evaluation of the split covers: every target once (a
    document's first character is context only, never a target).
    """
    writers = {
        split: ShardWriter(out_dir, split, seq_len=cfg.seq_len, corpus=corpus,
                           vocab_fingerprint=vocab.fingerprint, rows_per_shard=cfg.rows_per_shard)
        for split in SPLITS
    }
    stats = {s: Counter() for s in SPLITS}
    longest = unknown = total = 0
    for doc_ids, texts in iter_corpus(corpus_path):
        ids, lengths = encode_batch(vocab, texts)
        unknown += int(np.count_nonzero(ids == vocab.unk_id))
        total += len(ids)
        longest = max(longest, int(lengths.max(initial=0)))
        doc_split = split_of(doc_ids, cfg.val_fraction, cfg.test_fraction, cfg.split_salt)  # (D,)
        starts, doc_of, overlap = window_starts(lengths, cfg.seq_len)
        window_split = doc_split[doc_of]  # (W,)
        short = lengths < cfg.seq_len + 1
        for index, split in enumerate(SPLITS):
            docs, rows = doc_split == index, window_split == index
            writers[split].add(gather_windows(ids, starts[rows], cfg.seq_len), overlap[rows])
            long_docs = docs & ~short
            stats[split].update(documents=int(docs.sum()), chars=int(lengths[docs].sum()), windows=int(rows.sum()),
                                scored_chars=int((lengths[long_docs] - 1).sum()),
                                short_documents=int((short & docs).sum()),
                                chars_in_short_documents=int(lengths[short & docs].sum()))
    for split in SPLITS:
        if not stats[split]["windows"]:
            for w in writers.values():
                w.__exit__(PrepareError, None, None)
            raise PrepareError(
                f"prepare: the {corpus} corpus gives no {split} window: prepare.seq_len={cfg.seq_len} needs documents of "
                f"at least {cfg.seq_len + 1} characters (the longest has {longest}) in each split "
                f"({stats[split]['documents']} {split} documents); lower prepare.seq_len"
                + (", raise prepare.lines_per_doc" if corpus == "simpsons" else "")
                + (f", or raise prepare.{split}_fraction" if split != "train" else ", or lower prepare.val_fraction and prepare.test_fraction")
            )
    out = {}
    for split, writer in writers.items():
        shards = writer.close()
        out[split] = dict(stats[split], shards=len(shards))
    out["oov_rate"] = unknown / total if total else 0.0
    return out


def decode_shards(windows: np.ndarray, lengths: list[int], vocab: Vocab, seq_len: int) -> list[str]:
    """Inverse of windows_of for documents of known lengths (used to verify shards)."""
    texts, row = [], 0
    for length in lengths:
        if length < seq_len + 1:
            continue
        n = -(-(length - 1) // seq_len)
        doc = windows[row: row + n]
        row += n
        text = vocab.decode(doc[0])
        for k in range(1, n):
            start = min(k * seq_len, length - seq_len - 1)
            text += vocab.decode(doc[k][len(text) - start:])
        texts.append(text)
    return texts
