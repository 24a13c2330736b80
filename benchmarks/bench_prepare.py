"""Benchmark: corpus-to-shards throughput of the prepare stage, on one core.

Measures, side by side in one run:
  - `write_shards` (vectorised numpy encoding) in MB of text per second,
  - the same pipeline with a naive per-character Python loop for the encoding,
  - peak resident memory of `write_shards` at 1x and 10x the corpus size (each in a
    fresh subprocess), which should stay flat because shards are written one at a time,
  - the fan-out (counting and shard writing per part, as the `prepare` flow maps them) as
    one part on one thread against several parts on 1, 2 and all threads (no Prefect: the
    parts' own speed; a Prefect task run adds a fixed cost per part).

    python benchmarks/bench_prepare.py [--mb 8] [--naive-mb 2] [--parts 8] [--only fanout]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

pa.set_cpu_count(1)
pa.set_io_thread_count(1)

from model.data import prepare as prep  # noqa: E402
from model.data.prepare import (PrepareConfig, corpus_char_counts, count_part, merge_pieces, plan_parts, shard_layout,  # noqa: E402
                                wikipedia_documents, write_corpus, write_part_shards, write_shards)
from model.data.sources import SAMPLE_WIKIPEDIA  # noqa: E402
from model.data.vocab import Vocab, build_vocab  # noqa: E402


def make_corpus(path: Path, megabytes: float) -> int:
    """A corpus of the sample articles repeated (distinct ids) up to `megabytes` of text."""
    texts = [json.loads(line)["text"] for line in SAMPLE_WIKIPEDIA.read_text(encoding="utf-8").splitlines()]
    target = int(megabytes * 1e6)

    def docs():
        total, i = 0, 0
        while total < target:
            text = texts[i % len(texts)]
            yield f"doc-{i:08d}", text
            total += len(text.encode("utf-8"))
            i += 1

    return write_corpus(docs(), path)["chars"]


def naive_python_shards(corpus: Path, vocab, out: Path, seq_len: int = 100) -> None:
    """The naive baseline: one Python step per character and per window, then Parquet."""
    table = {c: i for i, c in enumerate(vocab.chars, start=1)}
    rows = []
    for _, texts in prep.iter_corpus(corpus):
        for text in texts:
            ids = [table.get(ch, 0) for ch in text]
            for start in range(0, len(ids) - seq_len, seq_len):
                rows.append(ids[start:start + seq_len + 1])
    column = pa.array(rows, type=pa.list_(pa.uint16(), seq_len + 1))
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"ids": column}), out / "train-00000-of-00001.parquet", compression="zstd")


def time_naive_python(corpus: Path) -> float:
    vocab = build_vocab(corpus_char_counts(corpus))
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        naive_python_shards(corpus, vocab, Path(out))
        return time.perf_counter() - started


def time_encode(corpus: Path, naive: bool) -> float:
    """The encoding step alone: numpy lookup table against a per-character loop."""
    vocab = build_vocab(corpus_char_counts(corpus))
    batches = [texts for _, texts in prep.iter_corpus(corpus)]
    started = time.perf_counter()
    for texts in batches:
        (naive_encode_docs(vocab, texts) if naive else vocab.encode_docs(texts))
    return time.perf_counter() - started


def naive_encode_docs(vocab, texts):
    """Vocab.encode_docs with one Python step per character instead of a lookup table."""
    table = {c: i for i, c in enumerate(vocab.chars, start=1)}
    ids = np.array([table.get(ch, 0) for text in texts for ch in text], dtype=np.uint16)
    return ids, np.array([len(t) for t in texts], dtype=np.int64), None


def run_once(corpus: Path, naive: bool) -> tuple[float, int]:
    vocab = build_vocab(corpus_char_counts(corpus))
    original = Vocab.encode_docs
    if naive:
        Vocab.encode_docs = naive_encode_docs
    try:
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            write_shards(corpus, vocab, Path(out), "bench", PrepareConfig(rows_per_shard=20_000))
            return time.perf_counter() - started, sum(len(t.encode()) for _, texts in prep.iter_corpus(corpus) for t in texts)
    finally:
        Vocab.encode_docs = original


def peak_rss_child(megabytes: float) -> tuple[float, float]:
    """(peak RSS in MB, MB/s) of write_shards on a fresh corpus, in its own process."""
    code = (
        "import resource, sys, tempfile; from pathlib import Path; sys.path.insert(0, %r);"
        "import benchmarks.bench_prepare as b; d = Path(tempfile.mkdtemp()); c = d / 'c.parquet';"
        "b.make_corpus(c, %r); base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        "s, n = b.run_once(c, False); peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        "print(peak / 1024, n / 1e6 / s)"
    ) % (str(Path(__file__).resolve().parent.parent), megabytes)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    peak, speed = map(float, out.stdout.split())
    return peak, speed


def fanout_seconds(articles: Path, docs_per_part: int, threads: int) -> float:
    """Count every part, build the vocabulary, write every part's shards and merge the shared ones, on `threads` threads."""
    import pyarrow.parquet as pq

    cfg = PrepareConfig(rows_per_shard=20_000)
    parts = plan_parts({"wikipedia": pq.ParquetFile(articles).metadata.num_rows}, docs_per_part)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(threads) as pool:
        out = Path(tmp)
        started = time.perf_counter()
        counted = list(pool.map(lambda p: count_part(wikipedia_documents(articles, p.start, p.stop), cfg), parts))
        chars = Counter()
        for c in counted:
            chars.update(c["char_counts"])
        vocab = build_vocab(chars)
        layout = shard_layout(parts, counted, cfg)
        list(pool.map(lambda p: write_part_shards(wikipedia_documents(articles, p.start, p.stop), vocab, out / "shards",
                                                  out / ".pieces", out / ".parts" / p.name, p, layout[p.name], cfg), parts))
        merge_pieces(out / ".pieces", out / "shards", out / ".parts" / "merge", "wikipedia", layout[parts[0].name], vocab, cfg)
        return time.perf_counter() - started


def fanout_rows(megabytes: float, n_parts: int) -> list[tuple[str, float]]:
    """(row, seconds), best of 3: one part on one thread, then n_parts parts on 1, 2 and every core's thread."""
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        corpus, articles = Path(tmp) / "corpus.parquet", Path(tmp) / "articles.parquet"
        make_corpus(corpus, megabytes)
        table = pq.read_table(corpus).rename_columns(["id", "text"])
        pq.write_table(table, articles, row_group_size=1000, compression="zstd")  # as ingest-wikipedia writes it
        per_part = -(-table.num_rows // n_parts)
        runs = [("one part, 1 thread", table.num_rows, 1)]
        for threads in sorted({1, 2, os.cpu_count() or 1}):
            runs.append((f"{n_parts} parts, {threads} thread{'s' if threads > 1 else ''}", per_part, threads))
        return [(name, min(fanout_seconds(articles, per, threads) for _ in range(3))) for name, per, threads in runs]


def print_fanout(megabytes: float, n_parts: int) -> None:
    rows = fanout_rows(megabytes, n_parts)
    print(f"\n## fan-out: count + shards per part, {megabytes:g} MB, threads (best of 3)\n")
    print("| parts and threads | seconds | MB/s | vs one part |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {megabytes / seconds:.1f} | {rows[0][1] / seconds:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=8.0, help="corpus size for the throughput rows (and 10x for memory)")
    parser.add_argument("--naive-mb", type=float, default=2.0, help="corpus size for the naive loop (it is slow)")
    parser.add_argument("--parts", type=int, default=8, help="parts of the fan-out rows")
    parser.add_argument("--only", choices=["fanout"], help="print only these rows")
    args = parser.parse_args()
    if args.only == "fanout":
        print_fanout(args.mb, args.parts)
        return
    with tempfile.TemporaryDirectory() as tmp:
        big, small = Path(tmp) / "big.parquet", Path(tmp) / "small.parquet"
        make_corpus(big, args.mb)
        make_corpus(small, args.naive_mb)
        small_mb = sum(len(t.encode()) for _, texts in prep.iter_corpus(small) for t in texts) / 1e6
        rows = []
        for name, corpus, naive in (("write_shards, vectorised", big, False), ("write_shards, vectorised", small, False),
                                    ("write_shards with a per-character encode loop", small, True)):
            best = min(run_once(corpus, naive) for _ in range(3))
            rows.append((name, best[1] / 1e6, best[1] / 1e6 / best[0]))
        rows.append(("naive Python: per-character encode and per-window lists", small_mb,
                     small_mb / min(time_naive_python(small) for _ in range(2))))
        encode = [("encode only, numpy lookup table", small_mb, small_mb / min(time_encode(small, False) for _ in range(3))),
                  ("encode only, per-character loop", small_mb, small_mb / min(time_encode(small, True) for _ in range(3)))]
    base = rows[1][2]
    print("## corpus -> shards, one core (seq_len 100, zstd), best of 3\n")
    print("| path | text MB | MB/s | vectorised vs this |")
    print("| --- | ---: | ---: | ---: |")
    for name, mb, mbps in rows:
        print(f"| {name} | {mb:.1f} | {mbps:.1f} | {base / mbps:.1f}x |")
    for name, mb, mbps in encode:
        print(f"| {name} | {mb:.1f} | {mbps:.1f} | {encode[0][2] / mbps:.1f}x |")
    print("\n## peak memory of write_shards (fresh process each)\n")
    print("| text MB | peak RSS MB | MB/s |")
    print("| ---: | ---: | ---: |")
    for mb in (args.mb, args.mb * 10):
        peak, mbps = peak_rss_child(mb)
        print(f"| {mb:.0f} | {peak:.0f} | {mbps:.1f} |")
    print_fanout(args.mb, args.parts)


if __name__ == "__main__":
    main()
