"""Two trainings on one machine: each keeps its share of the cores instead of both crawling.

Runs the real training loop (`python -m model.training.loop`) in separate processes, side
by side in one run: one alone, then two at once with the default thread count (each takes
its share of the cores: model/training/threads.py), then two at once that each take every
core (`num_threads` = all cores, torch's own default, as before). Prints a markdown table of
training chars/s (validation and checkpoints excluded). Target: each of two at once keeps
at least 40% of the solo rate.

    PYTHONPATH=. python benchmarks/bench_share.py              # about 9 minutes on 2 cores: the last row crawls
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_train import ALPHABET, make_shards  # noqa: E402
from model.data.vocab import build_vocab, count_chars  # noqa: E402
from model.training.threads import available_cores  # noqa: E402


def launch(shards: Path, vocab_path: Path, out: Path, steps: int, threads: int | None, registry: Path) -> subprocess.Popen:
    sets = [f"max_steps={steps}", "epochs=1000", "batch_size=32", "device=cpu", "checkpoint_every_steps=0",
            "log_every_steps=1000000", "early_stopping_patience=null", "max_val_windows=8",
            "model.embedding_dim=64", "model.hidden_sizes=[128, 128]", "model.dropout=0.0"]
    if threads:
        sets.append(f"num_threads={threads}")
    cmd = [sys.executable, "-m", "model.training.loop", "--shards", str(shards), "--vocab", str(vocab_path), "--out", str(out),
           *[a for s in sets for a in ("--set", s)]]
    env = dict(os.environ, HOMER_TRAINING_REGISTRY=str(registry), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def rates(procs: list[subprocess.Popen]) -> list[float]:
    out = []
    for proc in procs:
        stdout, _ = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"a training process failed (exit {proc.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1])["train_chars_per_s"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300, help="training steps per run")
    args = p.parse_args()
    cores = available_cores()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vocab = build_vocab(count_chars([ALPHABET]))
        vocab.save(tmp / "vocab.json")
        shards = make_shards(tmp / "shards", vocab, rows=4096, seq_len=100)
        registry = tmp / "registry"

        def run(name: str, n: int, threads: int | None) -> list[float]:
            return rates([launch(shards, tmp / "vocab.json", tmp / f"{name}-{i}", args.steps, threads, registry) for i in range(n)])

        solo = run("solo", 1, None)[0]
        shared = run("shared", 2, None)
        greedy = run("greedy", 2, cores)
    print(f"{cores} cores available; GRU emb 64 hidden [128, 128], batch 32, seq_len 100, {args.steps} steps per run\n")
    print("| runs | threads each | chars/s each | of the solo rate | target |")
    print("| --- | --- | ---: | ---: | --- |")
    print(f"| one alone | its share: {cores} | {solo:,.0f} | 100% | |")
    print(f"| two at once | its share: {max(1, cores // 2)} | {' / '.join(f'{r:,.0f}' for r in shared)} | "
          f"{' / '.join(f'{r / solo:.0%}' for r in shared)} | >= 40% each |")
    print(f"| two at once, each taking every core (num_threads={cores}) | {cores} | {' / '.join(f'{r:,.0f}' for r in greedy)} | "
          f"{' / '.join(f'{r / solo:.0%}' for r in greedy)} | |")


if __name__ == "__main__":
    main()
