"""Benchmark: what verifying a stage output costs, sizes (every `is_complete`) against checksums (inputs, `homer verify`).

Builds a prepare-like output of a few MB (a corpus of the sample articles, repeated, and
its shards) in a temporary directory, writes its manifest (which hashes every file), then
times, each from a warm page cache and with the in-process digest memo cleared:
  - the size check `is_complete` does,
  - the checksum check with xxh3_128 (the default) and with sha256 (the fallback).

    python benchmarks/bench_verify.py [--mb 25] [--repeat 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import json  # noqa: E402

from model.data.prepare import PrepareConfig, corpus_char_counts, write_corpus, write_shards  # noqa: E402
from model.data.sources import SAMPLE_WIKIPEDIA  # noqa: E402
from model.data.vocab import build_vocab  # noqa: E402
from model.store import outputs  # noqa: E402


def make_corpus(path: Path, megabytes: float) -> None:
    """The sample articles repeated (distinct ids) up to `megabytes` of text."""
    texts = [json.loads(line)["text"] for line in SAMPLE_WIKIPEDIA.read_text(encoding="utf-8").splitlines()]

    def docs():
        total, i = 0, 0
        while total < megabytes * 1e6:
            yield f"doc-{i:08d}", texts[i % len(texts)]
            total += len(texts[i % len(texts)].encode("utf-8"))
            i += 1

    write_corpus(docs(), path)


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        outputs._DIGESTS.clear()  # no memo: every run reads and hashes every file
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=25.0, help="megabytes of corpus text (about 7 MB of output: it compresses well)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "prepare" / "0123456789abcdef"
        (out / "corpora").mkdir(parents=True)
        make_corpus(out / "corpora" / "wikipedia.parquet", args.mb)
        vocab = build_vocab(corpus_char_counts(out / "corpora" / "wikipedia.parquet"))
        vocab.save(out / "vocab.json")
        write_shards(out / "corpora" / "wikipedia.parquet", vocab, out / "shards" / "wikipedia", "wikipedia",
                     PrepareConfig(rows_per_shard=5_000))
        files = outputs.list_files(out, checksums=False)
        total = sum(e["size"] for e in files.values())
        outputs._DIGESTS.clear()
        started = time.perf_counter()
        outputs.write_manifest(out, {"stage": "prepare", "fingerprint": out.name})
        write_s = time.perf_counter() - started
        outputs.list_files(out)  # warm the page cache
        rows = [("write_manifest (lists and hashes, xxh3_128)", write_s),
                ("sizes (`is_complete`)", best_of(args.repeat, lambda: outputs.is_complete(out))),
                ("checksums, xxh3_128 (`verify_output(checksums=True)`)",
                 best_of(args.repeat, lambda: outputs.verify_output(out, checksums=True)))]
        for name in files:  # the same files, hashed with the fallback
            files[name]["sha256"] = outputs._digest(out / name, "sha256")
        rows.append(("checksums, sha256 (the fallback without xxhash)",
                     best_of(args.repeat, lambda: outputs.file_problems(out, files, checksums=True))))
    print(f"prepare-like output: {len(files)} files, {total / 1e6:.1f} MB (best of {args.repeat}, warm page cache)\n")
    print("| check | seconds | MB/s |")
    print("| --- | ---: | ---: |")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.4f} | {total / 1e6 / seconds:,.0f} |")


if __name__ == "__main__":
    main()
