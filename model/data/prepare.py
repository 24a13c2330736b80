"""Corpora, vocabulary and sequence shards: the body of the `prepare` stage.

Articles become one document each; the character's lines are grouped into documents
of consecutive lines, so a training window may span several short lines. Documents
are split into train, validation and test by a hash of their id (never by window),
encoded with numpy lookup tables, cut into windows of seq_len + 1 ids with stride
seq_len (the last window of a document is aligned to its end, so no character is lost;
its `overlap` says how many of its targets the window before already holds, so an
evaluation scores each character once), and written one shard at a time.

Fan-out (the `prepare` flow maps one task per part): a part is a fixed range of a corpus's
documents (`plan_parts`). Counting a part (`count_part`) gives its characters and, per
split, its windows, which depend only on the documents' ids and lengths; so once every
part is counted, `shard_layout` knows where each part's windows fall in each split and
the split's shard count n. A part then writes the shards that lie wholly inside its
windows under their final names, and the pieces of the (at most two per split) shards it
shares with a neighbour as `.pieces/` files that `merge_pieces` joins. Shard boundaries
stay at multiples of rows_per_shard over the whole split, so the shards are byte-identical
to a one-part run (`write_shards`) whatever the number of parts or workers.

Validation chooses `best/` and early stopping; test is read only by the report.

Tokens (`prepare.tokenizer`, see model.data.tokenizers): `char` (one id per character),
`word` or `bpe`. Windows, lengths and seq_len count tokens; for word and BPE each window
also records `target_chars`, the characters of text its scored targets cover, so every
figure stays bits per character. Their vocabulary is built from the train split (BPE:
trained before counting, since its token counts depend on it); the character vocabulary
from every split, as before.

    homer stage prepare --profile sample --set prepare.seq_len=100   # the stage (flows/prepare.py) runs this module
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.data.shards import DEFAULT_ROWS_PER_SHARD, ShardWriter, shard_name
from model.data.tokenizers import WORD_RE
from model.data.vocab import Vocab, count_chars

CORPUS_SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string())])
SPLITS = ("train", "val", "test")  # test: never read in training, never chooses a model
READ_BATCH_ROWS = 512  # documents per batch: big enough to vectorise, small enough to stay in cache


class PrepareError(ValueError):
    """The corpora cannot be turned into shards as configured."""


# The tokenizer fields are left out of the fingerprint while they hold their defaults, so outputs made before they
# existed (characters) keep their fingerprints.
UNLESS_DEFAULT = {"fingerprint": "unless-default"}


class PrepareConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seq_len: int = Field(100, ge=1, le=100_000, description="tokens per training sequence (characters with tokenizer char; windows hold seq_len + 1 ids)")
    val_fraction: float = Field(0.1, gt=0, lt=1, allow_inf_nan=False, description="fraction of documents (by id hash) held out for validation: chooses best/ and early stopping")
    test_fraction: float = Field(0.1, gt=0, lt=1, allow_inf_nan=False, description="fraction of documents (by id hash) held out for the report's test figures; never read in training")
    min_count: int = Field(1, ge=1, description="char: keep characters seen at least this many times; word: words seen at least this many times in "
                                                "the train split; rarer ones become the unknown token. bpe: the least count of a pair it merges")
    tokenizer: Literal["char", "word", "bpe"] = Field("char", description="how text becomes tokens: char (one per character), word (lower-cased "
                                                      "words, punctuation and newlines as tokens of their own), bpe (a byte-level BPE trained on the train split)",
                                                      json_schema_extra=UNLESS_DEFAULT)
    max_vocab: int | None = Field(None, ge=2, le=2**32, description="word: at most this many entries (the unknown token included), the most "
                                                                   "frequent words kept; empty = no limit. Ids are uint32 past 65,536 entries",
                                     json_schema_extra=UNLESS_DEFAULT)
    vocab_size: int = Field(4096, ge=258, le=2**20, description="bpe: the vocabulary's size at most (the unknown token and the 256 bytes included)",
                          json_schema_extra=UNLESS_DEFAULT)
    lines_per_doc: int = Field(20, ge=1, description="consecutive lines of the character grouped into one document")
    rows_per_shard: int = Field(DEFAULT_ROWS_PER_SHARD, ge=1, description="windows per Parquet shard (bounds memory while writing)")
    split_salt: str = Field("homer", description="salt of the document hash that assigns train/val/test; change it for another split")
    # Where and in how many pieces the work runs, not what it makes: the output is byte-identical whatever these say.
    docs_per_part: int = Field(20_000, ge=1, description="documents per part: prepare runs one task per part of each corpus (the output does not depend on it)",
                               json_schema_extra={"fingerprint": False})
    task_runner: Literal["threads", "dask"] = Field("threads", description="where the parts run: threads of the flow's process, or a Dask cluster (pip install 'recurrent-homer[dask]')",
                                                    json_schema_extra={"fingerprint": False})
    dask_address: str | None = Field(None, description="with task_runner dask: the scheduler's address (tcp://host:8786); empty = a local Dask cluster started for the run",
                                     json_schema_extra={"fingerprint": False})
    max_workers: int | None = Field(None, ge=1, le=4096, description="parts at once: threads, or the local Dask cluster's worker processes; empty = one per CPU core",
                                    json_schema_extra={"fingerprint": False})

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


def group_lines(lines: Iterator[str], lines_per_doc: int, prefix: str, first: int = 0) -> Iterator[tuple[str, str]]:
    """Consecutive lines joined by newlines, `lines_per_doc` at a time; ids count from document `first`."""
    group: list[str] = []
    index = first
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


def window_counts(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """(D,) windows per document: ceil((L - 1) / seq_len), none below seq_len + 1 characters."""
    return np.where(lengths >= seq_len + 1, -(-(lengths - 1) // seq_len), 0)


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
    n_windows = window_counts(lengths, seq_len)  # (D,)
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


def window_target_chars(chars: np.ndarray, starts: np.ndarray, overlap: np.ndarray, seq_len: int) -> np.ndarray:
    """(W,) characters covered by each window's scored targets: tokens start + 1 + overlap .. start + seq_len.

    chars: (N,) characters per token of the concatenated documents; starts, overlap: (W,).
    """
    csum = np.concatenate([[0], np.cumsum(chars, dtype=np.int64)])  # (N + 1,) csum[i] = chars of tokens [0, i)
    return csum[starts + seq_len + 1] - csum[starts + 1 + overlap.astype(np.int64)]


def route_batch(doc_ids, texts: list[str], vocab: Vocab, sinks: dict, stats: dict[str, Counter],
                cfg: PrepareConfig) -> tuple[int, int, int]:
    """Encode a batch of documents and hand each split its windows (`sinks[split].add(windows, overlap[, target_chars])`),
    counting per split into `stats`; returns (unknown tokens, tokens, the longest document in tokens).

    Lengths count tokens; `chars` counts characters. For word and BPE the stats add `tokens` and
    `scored_tokens`, and `scored_chars` is what the windows' target_chars sum to.
    """
    ids, lengths, chars = vocab.encode_docs(texts)  # (N,), (D,) tokens, (N,) characters per token or None (char)
    text_chars = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))  # (D,)
    doc_split = split_of(doc_ids, cfg.val_fraction, cfg.test_fraction, cfg.split_salt)  # (D,)
    starts, doc_of, overlap = window_starts(lengths, cfg.seq_len)
    targets = None if chars is None else window_target_chars(chars, starts, overlap, cfg.seq_len)  # (W,)
    window_split = doc_split[doc_of]  # (W,)
    short = lengths < cfg.seq_len + 1
    for index, split in enumerate(SPLITS):
        docs, rows = doc_split == index, window_split == index
        windows = gather_windows(ids, starts[rows], cfg.seq_len)
        long_docs = docs & ~short
        if targets is None:
            sinks[split].add(windows, overlap[rows])
            scored = int((lengths[long_docs] - 1).sum())
        else:
            sinks[split].add(windows, overlap[rows], targets[rows])
            scored = int(targets[rows].sum())
            stats[split].update(tokens=int(lengths[docs].sum()), scored_tokens=int((lengths[long_docs] - 1).sum()))
        stats[split].update(documents=int(docs.sum()), chars=int(text_chars[docs].sum()), windows=int(rows.sum()),
                            scored_chars=scored,
                            short_documents=int((short & docs).sum()),
                            chars_in_short_documents=int(text_chars[short & docs].sum()))
    return int(np.count_nonzero(ids == vocab.unk_id)), len(ids), int(lengths.max(initial=0))


def shard_writer(out_dir: Path, split: str, corpus: str, vocab: Vocab, cfg: PrepareConfig) -> ShardWriter:
    """A ShardWriter for the vocabulary's ids (uint16 or uint32) with target_chars for word and BPE."""
    return ShardWriter(out_dir, split, seq_len=cfg.seq_len, corpus=corpus, vocab_fingerprint=vocab.fingerprint,
                       rows_per_shard=cfg.rows_per_shard, id_dtype=vocab.id_dtype, target_chars=vocab.kind != "char")


def write_shards(corpus_path: Path, vocab: Vocab, out_dir: Path, corpus: str, cfg: PrepareConfig) -> dict:
    """Encode one corpus into train/val/test shards under out_dir; return counts per split.

    `scored_chars` is what an evaluation of the split covers: every target once (a
    document's first character is context only, never a target).
    """
    writers = {split: shard_writer(out_dir, split, corpus, vocab, cfg) for split in SPLITS}
    stats = {s: Counter() for s in SPLITS}
    longest = unknown = total = 0
    for doc_ids, texts in iter_corpus(corpus_path):
        batch_unknown, batch_total, batch_longest = route_batch(doc_ids, texts, vocab, writers, stats, cfg)
        unknown, total, longest = unknown + batch_unknown, total + batch_total, max(longest, batch_longest)
    for split in SPLITS:
        if not stats[split]["windows"]:
            for w in writers.values():
                w.__exit__(PrepareError, None, None)
            raise no_window_error(corpus, split, cfg, longest, stats[split]["documents"])
    out = {}
    for split, writer in writers.items():
        shards = writer.close()
        out[split] = dict(stats[split], shards=len(shards))
    out["oov_rate"] = unknown / total if total else 0.0
    return out


def no_window_error(corpus: str, split: str, cfg: PrepareConfig, longest: int, documents: int) -> PrepareError:
    unit = "characters" if cfg.tokenizer == "char" else f"{cfg.tokenizer} tokens"
    return PrepareError(
        f"prepare: the {corpus} corpus gives no {split} window: prepare.seq_len={cfg.seq_len} needs documents of "
        f"at least {cfg.seq_len + 1} {unit} (the longest has {longest}) in each split "
        f"({documents} {split} documents); lower prepare.seq_len"
        + (", raise prepare.lines_per_doc" if corpus == "simpsons" else "")
        + (f", or raise prepare.{split}_fraction" if split != "train" else ", or lower prepare.val_fraction and prepare.test_fraction")
    )

# ---------------------------------------------------------------------------- fan-out: parts


class Part(BaseModel):
    """Documents [start, stop) of one corpus, in corpus order: what one mapped task reads."""

    model_config = ConfigDict(frozen=True)

    corpus: str
    index: int  # the part's number within its corpus
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.corpus}-{self.index:05d}"

    def describe(self) -> str:
        return f"part {self.name} (documents {self.start}-{max(self.start, self.stop - 1)} of the {self.corpus} corpus)"


def plan_parts(documents: dict[str, int], docs_per_part: int) -> list[Part]:
    """Each corpus (name -> its number of documents) cut into parts of docs_per_part documents; one part at least."""
    parts = []
    for corpus, n in documents.items():
        for i in range(max(1, -(-n // docs_per_part))):
            parts.append(Part(corpus=corpus, index=i, start=i * docs_per_part, stop=min(n, (i + 1) * docs_per_part)))
    return parts


def read_rows(path: Path, columns: list[str], start: int, stop: int, batch_rows: int = READ_BATCH_ROWS) -> Iterator[list[list]]:
    """Rows [start, stop) of a Parquet file as batches of column lists, reading only the row groups that hold them."""
    parquet = pq.ParquetFile(path)
    groups, first, row = [], None, 0
    for group in range(parquet.metadata.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if row < stop and row + rows > start:
            groups.append(group)
            first = row if first is None else first
        row += rows
    if not groups:
        return
    row = first
    for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns):
        lo, hi = max(start, row), min(stop, row + batch.num_rows)
        if lo < hi:
            part = batch.slice(lo - row, hi - lo)
            yield [part.column(i).to_pylist() for i in range(len(columns))]
        row += batch.num_rows
        if row >= stop:
            break


def wikipedia_documents(path: Path, start: int, stop: int) -> Iterator[tuple[list[str], list[str]]]:
    """Batches of (doc_ids, texts) of articles [start, stop) of an `articles.parquet`: one document per article."""
    for ids, texts in read_rows(path, ["id", "text"], start, stop):
        yield ids, texts


def simpsons_documents(path: Path, start: int, stop: int, lines_per_doc: int) -> Iterator[tuple[list[str], list[str]]]:
    """Batches of (doc_ids, texts) of documents [start, stop) of a `lines.parquet`, numbered as group_lines numbers them."""
    lines = (text for (texts,) in read_rows(path, ["text"], start * lines_per_doc, stop * lines_per_doc) for text in texts)
    batch: list[tuple[str, str]] = []
    for doc in group_lines(lines, lines_per_doc, "simpsons", first=start):
        batch.append(doc)
        if len(batch) == READ_BATCH_ROWS:
            yield [d for d, _ in batch], [t for _, t in batch]
            batch = []
    if batch:
        yield [d for d, _ in batch], [t for _, t in batch]


def count_part(batches: Iterator[tuple[list[str], list[str]]], cfg: PrepareConfig, vocab=None) -> dict:
    """A part's counts for the vocabulary and, per split, its documents and windows.

    Returns {"documents", "longest", "splits": {split: {"documents", "windows"}}, "char_counts": {char: n}}
    (char), with "word_counts": {word: n} over the train split's documents instead (word). Lengths
    count tokens: no vocabulary is needed for char and word; bpe needs its trained `vocab`.
    """
    if cfg.tokenizer == "bpe" and vocab is None:
        raise PrepareError("count_part: prepare.tokenizer=bpe counts tokens with the trained BPE; pass vocab")
    chars: Counter = Counter()
    words: Counter = Counter()
    splits = {split: {"documents": 0, "windows": 0} for split in SPLITS}
    documents = longest = 0
    for doc_ids, texts in batches:
        doc_split = split_of(doc_ids, cfg.val_fraction, cfg.test_fraction, cfg.split_salt)  # (D,)
        if cfg.tokenizer == "char":
            chars.update(count_chars(["".join(texts)]))
            lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))  # (D,)
        elif cfg.tokenizer == "word":
            tokens = [WORD_RE.findall(text) for text in texts]
            lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(texts))  # (D,)
            for found, split in zip(tokens, doc_split.tolist()):
                if split == 0:  # the vocabulary comes from the train split
                    words.update(t.lower() for t in found)
        else:
            lengths = vocab.encode_docs(texts)[1]  # (D,)
        n_windows = window_counts(lengths, cfg.seq_len)  # (D,)
        for index, split in enumerate(SPLITS):
            docs = doc_split == index
            splits[split]["documents"] += int(docs.sum())
            splits[split]["windows"] += int(n_windows[docs].sum())
        documents += len(texts)
        longest = max(longest, int(lengths.max(initial=0)))
    counted = {"documents": documents, "longest": longest, "splits": splits}
    if cfg.tokenizer == "char":
        counted["char_counts"] = dict(chars)
    elif cfg.tokenizer == "word":
        counted["word_counts"] = dict(words)
    return counted


def shard_layout(parts: list[Part], counted: list[dict], cfg: PrepareConfig) -> dict[str, dict[str, dict[str, int]]]:
    """Where each part's windows go: {part name: {split: {"offset", "windows", "total", "shards"}}}.

    `offset` is the index of the part's first window in the split of its corpus (parts in
    corpus order), `total` the split's windows and `shards` its shard count n. Raises the
    PrepareError of write_shards when a corpus gives a split no window.
    """
    layout: dict[str, dict[str, dict[str, int]]] = {}
    for corpus in dict.fromkeys(p.corpus for p in parts):
        mine = sorted(((p, c) for p, c in zip(parts, counted) if p.corpus == corpus), key=lambda pc: pc[0].index)
        longest = max(c["longest"] for _, c in mine)
        totals = {split: sum(c["splits"][split]["windows"] for _, c in mine) for split in SPLITS}
        for split in SPLITS:
            if not totals[split]:
                raise no_window_error(corpus, split, cfg, longest, sum(c["splits"][split]["documents"] for _, c in mine))
        offsets = dict.fromkeys(SPLITS, 0)
        for part, c in mine:
            layout[part.name] = {}
            for split in SPLITS:
                windows = c["splits"][split]["windows"]
                layout[part.name][split] = {"offset": offsets[split], "windows": windows, "total": totals[split],
                                            "shards": -(-totals[split] // cfg.rows_per_shard)}
                offsets[split] += windows
    return layout


PIECE_COLUMNS = ("windows", "overlap", "target_chars")  # the arrays of a piece (target_chars for word and BPE)
PIECE_RE = re.compile(r"^(?P<split>[a-z]+)-(?P<j>\d{5})-(?P<start>\d{12})\.npz$")


class _PartSplit:
    """A part's windows of one split, routed by where they fall in the split's shards.

    Windows [offset, offset + windows) of the split; shard j holds [j * R, min((j + 1) * R, total)).
    The shards that lie wholly inside go to a ShardWriter that starts on a shard boundary (so
    its shards are the split's), then take their final names; the windows before the first
    boundary (head) and after the last (tail) belong to shards shared with a neighbouring
    part and are saved as pieces, `<split>-<j:05d>-<start:012d>.npz`, for merge_pieces.
    """

    def __init__(self, split: str, place: dict[str, int], shards_dir: Path, pieces_dir: Path, scratch: Path,
                 corpus: str, vocab: Vocab, cfg: PrepareConfig):
        r = cfg.rows_per_shard
        self.split, self.rows_per_shard, self.shards_dir, self.pieces_dir = split, r, shards_dir, pieces_dir
        self.offset, self.end, self.total, self.n = place["offset"], place["offset"] + place["windows"], place["total"], place["shards"]
        self.head_end = min(-(-self.offset // r) * r, self.end)  # the first shard boundary at or after offset
        self.body_end = max(self.head_end, self.total if self.end == self.total else self.end // r * r)
        self.cursor = self.offset
        self.head: list[tuple[np.ndarray, ...]] = []  # (windows, overlap[, target_chars])
        self.tail: list[tuple[np.ndarray, ...]] = []
        self.writer = shard_writer(scratch / split, split, corpus, vocab, cfg)

    def add(self, windows: np.ndarray, overlap: np.ndarray, target_chars: np.ndarray | None = None) -> None:
        start, stop = self.cursor, self.cursor + len(windows)
        if stop > self.end:
            raise PrepareError(f"{self.split}: more windows than counted ({stop - self.offset} > {self.end - self.offset}); "
                               f"did the input change while prepare ran?")
        a, b = (int(np.clip(cut - start, 0, len(windows))) for cut in (self.head_end, self.body_end))
        columns = (windows, overlap) if target_chars is None else (windows, overlap, target_chars)
        if a:
            self.head.append(tuple(c[:a] for c in columns))
        self.writer.add(*(c[a:b] for c in columns))
        if b < len(windows):
            self.tail.append(tuple(c[b:] for c in columns))
        self.cursor = stop

    def close(self) -> int:
        """Name the whole shards, save the pieces; returns the number of whole shards."""
        first = self.head_end // self.rows_per_shard
        written = self.writer.close()
        for i, path in enumerate(written):
            os.replace(path, self.shards_dir / shard_name(self.split, first + i, self.n))
        for start, chunks in ((self.offset, self.head), (self.body_end, self.tail)):
            if chunks:
                self.pieces_dir.mkdir(parents=True, exist_ok=True)
                piece = self.pieces_dir / f"{self.split}-{start // self.rows_per_shard:05d}-{start:012d}.npz"
                np.savez(piece, **{name: np.concatenate([c[i] for c in chunks]) for i, name in enumerate(PIECE_COLUMNS[:len(chunks[0])])})
        return len(written)

    def abort(self) -> None:
        self.writer.__exit__(PrepareError, None, None)


def write_part_shards(batches: Iterator[tuple[list[str], list[str]]], vocab: Vocab, shards_dir: Path, pieces_dir: Path,
                      scratch: Path, part: Part, place: dict[str, dict[str, int]], cfg: PrepareConfig) -> dict:
    """Encode a part's documents and write its windows as shard_layout placed them (see _PartSplit).

    Returns {"splits": {split: counts as write_shards counts them}, "unknown", "total" (tokens), "whole_shards"}.
    """
    shards_dir.mkdir(parents=True, exist_ok=True)
    routers = {split: _PartSplit(split, place[split], shards_dir, pieces_dir, scratch, part.corpus, vocab, cfg)
               for split in SPLITS}
    stats = {s: Counter() for s in SPLITS}
    unknown = total = 0
    try:
        for doc_ids, texts in batches:
            batch_unknown, batch_total, _ = route_batch(doc_ids, texts, vocab, routers, stats, cfg)
            unknown, total = unknown + batch_unknown, total + batch_total
        for split in SPLITS:
            if stats[split]["windows"] != place[split]["windows"]:
                raise PrepareError(f"{split}: {stats[split]['windows']} windows, but counting found {place[split]['windows']}; "
                                   f"did the input change while prepare ran?")
    except BaseException:
        for router in routers.values():
            router.abort()
        raise
    whole = sum(router.close() for router in routers.values())
    shutil.rmtree(scratch, ignore_errors=True)
    return {"splits": {s: dict(stats[s]) for s in SPLITS}, "unknown": unknown, "total": total, "whole_shards": whole}


def merge_pieces(pieces_dir: Path, shards_dir: Path, scratch: Path, corpus: str, totals: dict[str, dict[str, int]],
                 vocab: Vocab, cfg: PrepareConfig) -> int:
    """Join the pieces of the shards that parts share into whole shards with their final names; returns how many.

    totals: {split: {"total", "shards"}} (shard_layout's). A piece missing or out of place is a PrepareError.
    """
    r = cfg.rows_per_shard
    groups: dict[tuple[str, int], list[tuple[int, Path]]] = {}
    for path in sorted(pieces_dir.iterdir()) if pieces_dir.is_dir() else []:
        if m := PIECE_RE.match(path.name):
            groups.setdefault((m["split"], int(m["j"])), []).append((int(m["start"]), path))
    shards_dir.mkdir(parents=True, exist_ok=True)
    for (split, j), found in sorted(groups.items()):
        want = min((j + 1) * r, totals[split]["total"])
        names = PIECE_COLUMNS if vocab.kind != "char" else PIECE_COLUMNS[:2]
        columns: dict[str, list[np.ndarray]] = {name: [] for name in names}
        at = j * r
        for start, path in sorted(found):
            if start != at:
                raise PrepareError(f"{path}: a piece of {corpus} {split} shard {j} starting at window {start}, where {at} "
                                   f"was expected; the pieces of windows {at}-{start - 1} are missing")
            with np.load(path) as data:
                for name in names:
                    columns[name].append(data[name])
            at += len(columns["windows"][-1])
        if at != want:
            raise PrepareError(f"{pieces_dir}: the pieces of {corpus} {split} shard {j} end at window {at}, not {want}")
        writer = shard_writer(scratch / f"merge-{split}-{j:05d}", split, corpus, vocab, cfg)
        writer.add(*(np.concatenate(columns[name]) for name in names))
        (only,) = writer.close()
        os.replace(only, shards_dir / shard_name(split, j, totals[split]["shards"]))
    shutil.rmtree(scratch, ignore_errors=True)
    return len(groups)


def shard_counts(results: list[dict], totals: dict[str, dict[str, int]]) -> dict:
    """One corpus's counts from its parts' write_part_shards results, as write_shards reports them."""
    stats = {s: Counter() for s in SPLITS}
    unknown = total = 0
    for result in results:
        for split in SPLITS:
            stats[split].update(result["splits"][split])
        unknown += result["unknown"]
        total += result["total"]
    out: dict = {split: dict(stats[split], shards=totals[split]["shards"]) for split in SPLITS}
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
