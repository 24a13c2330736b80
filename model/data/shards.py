"""Parquet sequence shards: write windows of token ids one shard at a time, read them back.

A shard is `{split}-{i:05d}-of-{n:05d}.parquet` with a column `ids` of type
`fixed_size_list<uint16>[seq_len + 1]` (x = ids[:-1], y = ids[1:]; `uint32` values for a
vocabulary of more than 65,536 entries: the column's type records it, and every reader
returns the shard's own dtype) and a column `overlap` (uint32: how many leading targets of
the window the window before it in the same document already holds; non-zero only for a
document's last, end-aligned window, so an evaluation that skips them scores each token
once), zstd-compressed, with schema metadata naming the vocabulary fingerprint, seq_len,
corpus and split. Shards of the word and BPE tokenizers add `target_chars` (uint32: the
characters of document text that the window's scored targets cover, overlap excluded), the
denominator of bits per character; character shards leave it out (each target is one
character), so they stay as they were.

    with ShardWriter(out_dir, "train", seq_len=100, corpus="homer", vocab_fingerprint=fp) as w:
        w.add(windows, overlap)             # (N, seq_len + 1) uint16, (N,) overlap
    windows, meta = read_split(out_dir, "train")   # (N_total, seq_len + 1) uint16 or uint32
    windows = open_split(out_dir, "train")         # the same rows, memory-mapped (training reads these)
    overlap = read_overlap(out_dir, "train")       # (N_total,) uint32
    chars = read_target_chars(out_dir, "train")    # (N_total,) uint32, or None for character shards
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SHARD_RE = re.compile(r"^(?P<split>[a-z]+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.parquet$")
DEFAULT_ROWS_PER_SHARD = 50_000


class ShardError(ValueError):
    """Shards are missing, incomplete or inconsistent."""


def shard_name(split: str, i: int, n: int) -> str:
    return f"{split}-{i:05d}-of-{n:05d}.parquet"


class ShardWriter:
    """Buffers windows and writes a shard each time `rows_per_shard` rows are ready.

    Shards are written under hidden partial names and renamed to their final
    `-of-{n}` names on close, once n is known; memory holds at most one shard.
    """

    def __init__(self, out_dir, split: str, *, seq_len: int, corpus: str, vocab_fingerprint: str,
                 rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, id_dtype: type = np.uint16, target_chars: bool = False):
        """id_dtype: np.uint16 or np.uint32 (vocab.id_dtype); target_chars: write the `target_chars` column (word, bpe)."""
        if np.dtype(id_dtype) not in (np.dtype(np.uint16), np.dtype(np.uint32)):
            raise ShardError(f"shard ids are uint16 or uint32, not {np.dtype(id_dtype)}")
        self.id_dtype = np.dtype(id_dtype)
        self.with_chars = target_chars
        self.out_dir = Path(out_dir)
        self.split = split
        self.seq_len = seq_len
        self.rows_per_shard = rows_per_shard
        self.width = seq_len + 1
        id_type = pa.from_numpy_dtype(self.id_dtype)
        fields = [pa.field("ids", pa.list_(id_type, self.width)), pa.field("overlap", pa.uint32())]
        self.schema = pa.schema(
            fields + ([pa.field("target_chars", pa.uint32())] if target_chars else []),
            metadata={
                "vocab_fingerprint": vocab_fingerprint,
                "seq_len": str(seq_len),
                "corpus": corpus,
                "split": split,
            },
        )
        self._pending: list[np.ndarray] = []
        self._pending_overlap: list[np.ndarray] = []
        self._pending_chars: list[np.ndarray] = []
        self._pending_rows = 0
        self._partials: list[Path] = []
        self.rows = 0
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def add(self, windows: np.ndarray, overlap: np.ndarray | None = None, target_chars: np.ndarray | None = None) -> None:
        """Queue (N, seq_len + 1) windows; `overlap` (N,) defaults to none (every target scored);
        `target_chars` (N,) is required exactly when the writer has the column."""
        if windows.ndim != 2 or windows.shape[1] != self.width:
            raise ShardError(f"windows must be (N, {self.width}), got {windows.shape}")
        if (target_chars is not None) != self.with_chars:
            raise ShardError("target_chars must be given exactly when the writer was made with target_chars=True")
        if not len(windows):
            return
        overlap = np.zeros(len(windows), np.uint32) if overlap is None else np.asarray(overlap, dtype=np.uint32)
        if overlap.shape != (len(windows),) or (overlap >= self.width).any():
            raise ShardError(f"overlap must be (N,) = ({len(windows)},) values below {self.width}, got {overlap.shape}")
        if windows.dtype.itemsize > self.id_dtype.itemsize and len(windows) and windows.max() > np.iinfo(self.id_dtype).max:
            raise ShardError(f"ids up to {windows.max()} do not fit the writer's {self.id_dtype}")
        self._pending.append(np.ascontiguousarray(windows, dtype=self.id_dtype))
        self._pending_overlap.append(overlap)
        if self.with_chars:
            chars = np.asarray(target_chars, dtype=np.uint32)
            if chars.shape != (len(windows),):
                raise ShardError(f"target_chars must be (N,) = ({len(windows)},), got {chars.shape}")
            self._pending_chars.append(chars)
        self._pending_rows += len(windows)
        while self._pending_rows >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, rows: int) -> None:
        block = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]  # one copy at most
        overlaps = np.concatenate(self._pending_overlap) if len(self._pending_overlap) > 1 else self._pending_overlap[0]
        head, rest = block[:rows], block[rows:]
        self._pending = [rest] if len(rest) else []
        self._pending_overlap = [overlaps[rows:]] if len(rest) else []
        self._pending_rows = len(rest)
        values = pa.array(head.reshape(-1), type=pa.from_numpy_dtype(self.id_dtype))
        column = pa.FixedSizeListArray.from_arrays(values, self.width)
        columns = [column, pa.array(overlaps[:rows], type=pa.uint32())]
        if self.with_chars:
            chars = np.concatenate(self._pending_chars) if len(self._pending_chars) > 1 else self._pending_chars[0]
            self._pending_chars = [chars[rows:]] if len(rest) else []
            columns.append(pa.array(chars[:rows], type=pa.uint32()))
        table = pa.Table.from_arrays(columns, schema=self.schema)
        path = self.out_dir / f".{self.split}-{len(self._partials):05d}.partial"
        # Byte-stream split + zstd: smaller and about twice as fast as dictionary encoding here.
        pq.write_table(table, path, compression="zstd", use_dictionary=False, use_byte_stream_split=True,
                       write_statistics=False)
        self._partials.append(path)
        self.rows += len(head)

    def close(self) -> list[Path]:
        if self._pending_rows:
            self._flush(self._pending_rows)
        n = len(self._partials)
        final = []
        for i, partial in enumerate(self._partials):
            target = self.out_dir / shard_name(self.split, i, n)
            os.replace(partial, target)
            final.append(target)
        self._partials = []
        return final

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            for p in self._partials:
                p.unlink(missing_ok=True)


def _remake(path) -> str:
    """': the prepare output <dir> is damaged; re-run ...' when `path` lies in a stage output, else a plain hint."""
    from model.store.outputs import damaged_file_hint

    return damaged_file_hint(Path(path)) or "; re-run the prepare stage"


def list_shards(shards_dir, split: str) -> list[Path]:
    """The split's shard paths in order; raises, naming the missing file, if one of the `-of-n` set is missing."""
    shards_dir = Path(shards_dir)
    found = {}
    for path in shards_dir.glob(f"{split}-*.parquet"):
        m = SHARD_RE.match(path.name)
        if m and m["split"] == split:
            found[int(m["i"])] = (int(m["n"]), path)
    if not found:
        hint = _remake(shards_dir)
        raise ShardError(f"{shards_dir}: no {split} shards" + (hint if "damaged" in hint else "; run the prepare stage first"))
    totals = {n for n, _ in found.values()}
    n = max(totals)
    if len(totals) != 1 or sorted(found) != list(range(n)):
        missing = [shards_dir / shard_name(split, i, n) for i in range(n) if i not in found]
        what = f"{missing[0]} is missing" if missing else f"shards of different sets ({sorted(totals)})"
        raise ShardError(f"{shards_dir}: {split} shards are incomplete (found {sorted(found)} of {n}; {what})"
                         f"{_remake(shards_dir)}")
    return [found[i][1] for i in range(n)]


def _read(path: Path, columns: list[str]) -> pa.Table:
    """pq.read_table with an error naming the shard and the stage that remakes it (a truncated file, say)."""
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise ShardError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}){_remake(path)}") from exc


def shard_metadata(path) -> dict:
    meta = _schema(path).metadata or {}
    out = {k.decode(): v.decode() for k, v in meta.items() if not k.startswith(b"ARROW")}
    if "seq_len" in out:
        out["seq_len"] = int(out["seq_len"])
    return out


def split_metadata(paths: list[Path], split: str) -> dict:
    """The metadata the split's shards share; a shard of another vocabulary or seq_len is named."""
    meta = None
    for path in paths:
        this = shard_metadata(path)
        if meta is None:
            meta = this
        elif {k: this.get(k) for k in ("vocab_fingerprint", "seq_len")} != {k: meta.get(k) for k in ("vocab_fingerprint", "seq_len")}:
            raise ShardError(f"{path}: metadata {this} differs from the other {split} shards {meta}")
    return meta


def read_split(shards_dir, split: str) -> tuple[np.ndarray, dict]:
    """All windows of a split, (N, seq_len + 1) in the shards' dtype (uint16 or uint32), and the shards' shared metadata."""
    paths = list_shards(shards_dir, split)
    meta, blocks = split_metadata(paths, split), []
    width = meta["seq_len"] + 1
    for path in paths:
        values = _read(path, ["ids"]).column("ids").combine_chunks().values.to_numpy(zero_copy_only=False)
        blocks.append(values.reshape(-1, width))
    windows = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
    meta = dict(meta, rows=len(windows), shards=len(paths))
    return windows, meta


class SplitWindows:
    """A split's windows, (N, seq_len + 1) uint16 or uint32 (the shards'), without holding them in memory.

    Each shard is memory-mapped from a local `.npy` copy kept by the shard's checksum
    (`window_cache_dir()`), written once, one shard at a time; indexing with an array of rows
    or a slice gathers just those rows. So a training's memory does not grow with the corpus:
    the pages it reads are the page cache's, not the process's own.
    """

    def __init__(self, arrays: list[np.ndarray], meta: dict):
        self.arrays = arrays
        self.meta = meta
        self.offsets = np.cumsum([0, *(len(a) for a in arrays)])  # (S + 1,) first row of each shard
        self.shape = (int(self.offsets[-1]), int(meta["seq_len"]) + 1)
        self.dtype = np.result_type(*(a.dtype for a in arrays)) if arrays else np.dtype(np.uint16)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(len(self)))
        rows = np.asarray(rows, dtype=np.int64)  # (B,)
        out = np.empty((len(rows), self.shape[1]), self.dtype)  # (B, T + 1)
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        for i in np.unique(shard):
            picked = shard == i
            out[picked] = self.arrays[i][rows[picked] - self.offsets[i]]
        return out


def window_cache_dir() -> Path:
    """Where shards' `.npy` copies live: $HOMER_CACHE_DIR/windows (default ~/.cache/recurrent-homer/windows)."""
    base = os.environ.get("HOMER_CACHE_DIR") or Path.home() / ".cache" / "recurrent-homer"
    return Path(base).expanduser() / "windows"


def _mapped(path: Path, width: int, cache: Path) -> np.ndarray:
    """The shard's ids as a read-only memory map of its `.npy` copy, made first if missing."""
    from model.store.outputs import CHECKSUM, _digest

    copy = cache / f"{_digest(path, CHECKSUM)}-{width}.npy"
    if not copy.is_file():
        values = _read(path, ["ids"]).column("ids").combine_chunks().values.to_numpy(zero_copy_only=False)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = copy.with_name(f".{copy.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as handle:  # a file object: np.save would add ".npy" to the temporary name
            np.save(handle, values.reshape(-1, width), allow_pickle=False)  # the shard's own dtype: uint16 or uint32
        os.replace(tmp, copy)
    return np.load(copy, mmap_mode="r", allow_pickle=False)


def open_split(shards_dir, split: str, cache: Path | None = None) -> SplitWindows:
    """A split's windows as SplitWindows (memory-mapped), after the same checks as read_split."""
    paths = list_shards(shards_dir, split)
    meta = split_metadata(paths, split)
    width = meta["seq_len"] + 1
    arrays = [_mapped(path, width, cache or window_cache_dir()) for path in paths]
    return SplitWindows(arrays, dict(meta, rows=sum(map(len, arrays)), shards=len(paths)))


def _schema(path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise ShardError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}){_remake(path)}") from exc


def read_overlap(shards_dir, split: str) -> np.ndarray:
    """(N,) uint32 per window of the split: leading targets already held by the window before it."""
    blocks = []
    for path in list_shards(shards_dir, split):
        table = _read(path, ["overlap"]) if "overlap" in _schema(path).names else None
        if table is None:
            raise ShardError(f"{path}: no `overlap` column (written by an older prepare); re-run the prepare stage")
        blocks.append(table.column("overlap").to_numpy().astype(np.uint32, copy=False))
    return np.concatenate(blocks) if blocks else np.zeros(0, np.uint32)


def read_target_chars(shards_dir, split: str) -> np.ndarray | None:
    """(N,) uint32 per window of the split: the characters its scored targets cover; None for character shards (no column)."""
    paths = list_shards(shards_dir, split)
    has = ["target_chars" in _schema(path).names for path in paths]
    if not any(has):
        return None
    if not all(has):
        raise ShardError(f"{paths[has.index(False)]}: no `target_chars` column, unlike the other {split} shards{_remake(paths[0])}")
    return np.concatenate([_read(path, ["target_chars"]).column("target_chars").to_numpy().astype(np.uint32, copy=False)
                           for path in paths])
