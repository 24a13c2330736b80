"""One training process against two (DDP, gloo) on the CPU: the same global batch, the same data.

Runs the real entry points side by side in one run, each in processes of its own: the one
training loop alone (`python -m model.training.loop`: its share of the cores, all of them
here), then two ranks under torchrun (`python -m model.training.distributed` with
`nproc_per_node=2`: each rank takes its share, half the cores, and trains on half of each
global batch). Prints a markdown table of training chars/s (validation and checkpoints
excluded; for DDP, rank 0's clock, which includes the gradient all-reduce) and the wall time
of each command, start-up included (torchrun and each rank import torch). Each measurement is
the best of `--repeats` runs, one process and two taking turns, so a noisy neighbour hits both.

    PYTHONPATH=. python benchmarks/bench_ddp.py              # about 5 minutes on 2 quiet cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_train import ALPHABET, make_shards  # noqa: E402
from model.data.vocab import build_vocab, count_chars  # noqa: E402
from model.training.threads import available_cores  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run(shards: Path, vocab_path: Path, out: Path, steps: int, batch: int, nproc: int, registry: Path) -> tuple[float, float]:
    """(train chars/s, wall seconds) of one training command."""
    sets = [f"max_steps={steps}", "epochs=1000", f"batch_size={batch}", "device=cpu", "checkpoint_every_steps=0",
            "log_every_steps=1000000", "early_stopping_patience=null", "max_val_windows=8",
            "model.embedding_dim=64", "model.hidden_sizes=[128, 128]", "model.dropout=0.0"]
    module = "model.training.loop" if nproc == 1 else "model.training.distributed"
    if nproc > 1:
        sets.append(f"nproc_per_node={nproc}")
    cmd = [sys.executable, "-m", module, "--shards", str(shards), "--vocab", str(vocab_path), "--out", str(out),
           *[a for s in sets for a in ("--set", s)]]
    env = dict(os.environ, HOMER_TRAINING_REGISTRY=str(registry), PYTHONPATH=str(REPO))
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{module} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["train_chars_per_s"], wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100, help="training steps per run")
    p.add_argument("--repeats", type=int, default=2, help="runs of each measurement (the best counts)")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 128], help="global batch sizes to compare")
    args = p.parse_args()
    cores = available_cores()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vocab = build_vocab(count_chars([ALPHABET]))
        vocab.save(tmp / "vocab.json")
        shards = make_shards(tmp / "shards", vocab, rows=4096, seq_len=100)
        for batch in args.batches:
            best: dict[int, tuple[float, float]] = {}
            for repeat in range(args.repeats):
                for nproc in (1, 2):
                    rate, wall = run(shards, tmp / "vocab.json", tmp / f"b{batch}-p{nproc}-{repeat}", args.steps, batch, nproc,
                                     tmp / "registry")
                    best[nproc] = max(best.get(nproc, (0.0, 0.0)), (rate, wall))
            rows += [(batch, nproc, *best[nproc]) for nproc in (1, 2)]
    print(f"{cores} cores available; GRU emb 64 hidden [128, 128], seq_len 100, {args.steps} steps per run, best of "
          f"{args.repeats}, torch {__import__('torch').__version__}\n")
    print("| global batch | processes | threads each | chars/s | vs one process | wall s (start-up included) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    solo = {}
    for batch, nproc, rate, wall in rows:
        solo.setdefault(batch, rate)
        print(f"| {batch} | {nproc} | {max(1, cores // nproc)} | {rate:,.0f} | {rate / solo[batch]:.2f}x | {wall:.1f} |")


if __name__ == "__main__":
    main()
