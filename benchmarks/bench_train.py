"""Training and generation throughput, measured side by side in one run, printed as markdown.

(a) the real `train()` loop vs a bare loop over in-memory tensors (same model, batch size,
    steps; target ratio >= 0.9); (b) generation with carried state vs re-feeding a
    100-character window at batch 1 (target >= 10x); (c) batched generation at batch
    1/16/64; (d) on CUDA only: the published model at batch 64 and 256 in fp32, TF32 and bf16.

    PYTHONPATH=. python benchmarks/bench_train.py                 # small CPU sizes, about a minute on 2 cores
    PYTHONPATH=. python benchmarks/bench_train.py --hidden-sizes 256,512,1024,512,256 --embedding-dim 256 --batch-size 64
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.generation.sampling import generate, generate_refeed
from model.network.rnn import ModelConfig, build_model
from model.data.shards import ShardWriter, read_split
from model.training.loop import TrainCallbacks, TrainConfig, train
from model.data.vocab import build_vocab, count_chars

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"-()\n"


def make_shards(out: Path, vocab, rows: int, seq_len: int, seed: int = 0) -> Path:
    """Random windows, (rows, seq_len + 1) for train and a few for val."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", rows), ("val", 64)):
        with ShardWriter(out, split, seq_len=seq_len, corpus="bench", vocab_fingerprint=vocab.fingerprint) as w:
            w.add(rng.integers(1, vocab.size, size=(n, seq_len + 1), dtype=np.uint16))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(cfg: ModelConfig, vocab_size: int, windows: torch.Tensor, batch_size: int, steps: int,
              device: torch.device) -> float:
    """chars/s of the minimal loop: in-memory batches, forward, loss, backward, clip, Adam step."""
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = windows.to(device=device, dtype=torch.long)  # (N, T + 1)
    order = torch.randperm(len(data), device=device)
    sync(device)
    start = time.perf_counter()
    for s in range(steps):
        batch = data[order[s * batch_size:(s + 1) * batch_size]]  # (B, T + 1)
        logits, _ = model(batch[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
    sync(device)
    return steps * batch_size * (data.shape[1] - 1) / (time.perf_counter() - start)


def best_rate(chars: int, fn, repeats: int) -> float:
    """chars/s of the fastest of `repeats` calls (the machine may be shared: noise only slows)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return chars / min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--embedding-dim", type=int, default=64)
    p.add_argument("--hidden-sizes", default="128,128", help="comma-separated hidden sizes")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=100)
    p.add_argument("--steps", type=int, default=60, help="training steps per measurement (a) and (d)")
    p.add_argument("--gen-length", type=int, default=400, help="characters per sample, carried state")
    p.add_argument("--refeed-length", type=int, default=100, help="characters of the re-feeding baseline")
    p.add_argument("--repeats", type=int, default=3, help="each measurement is the best of this many runs")
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cfg = ModelConfig(embedding_dim=args.embedding_dim, hidden_sizes=[int(h) for h in args.hidden_sizes.split(",")])
    vocab = build_vocab(count_chars([ALPHABET]))
    rows = [f"{device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, model {cfg.cell} "
            f"emb {cfg.embedding_dim} hidden {cfg.hidden_sizes}, V={vocab.size}, seq_len {args.seq_len}, "
            f"{args.steps} steps; best of {args.repeats} runs each", "",
            "| measurement | chars/s | baseline chars/s | ratio | target |", "| --- | ---: | ---: | ---: | --- |"]

    def row(name: str, value: float, base: float | None = None, target: str = "") -> None:
        ratio = f"{value / base:.2f}x" if base else ""
        rows.append(f"| {name} | {value:,.0f} | {'' if base is None else f'{base:,.0f}'} | {ratio} | {target} |")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # (a) the real loop vs a bare loop: one epoch of exactly `steps` batches
        shards = make_shards(tmp / "shards", vocab, args.steps * args.batch_size, args.seq_len)
        windows = torch.from_numpy(read_split(shards, "train")[0].astype(np.int64))  # (N, T + 1)
        bare_loop(cfg, vocab.size, windows, args.batch_size, args.steps, device)  # warm-up
        tcfg = TrainConfig(batch_size=args.batch_size, epochs=1, log_every_steps=10, checkpoint_every_steps=0,
                           early_stopping_patience=None, device=str(device), precision="fp32", max_val_windows=64)
        loop, wall, bare = [], [], []
        for r in range(args.repeats):  # interleaved, so drifting load hits both alike
            start = time.perf_counter()
            result = train(model_config=cfg, train_config=tcfg, shards_dir=shards, out_dir=tmp / f"run{r}", vocab=vocab)
            wall.append(args.steps * args.batch_size * args.seq_len / (time.perf_counter() - start))
            loop.append(result.train_chars_per_s)
            bare.append(bare_loop(cfg, vocab.size, windows, args.batch_size, args.steps, device))
        row(f"(a) train() steps, batch {args.batch_size} (validation, checkpoints excluded)", max(loop), max(bare),
            ">= 0.9x bare loop")
        row("(a) train() end to end (shard read, validation, 2 checkpoints included)", max(wall), max(bare))
        row(f"(a) bare loop over in-memory tensors, batch {args.batch_size}", max(bare))

        # (b) carried state vs re-feeding a 100-character window, batch 1
        model = build_model(cfg, vocab.size).to(device).eval()
        prompt = "".join(np.random.default_rng(1).choice(list(ALPHABET[:-1]), 100))
        generate(model, vocab, prompt=prompt, length=20)  # warm-up
        carried = best_rate(args.gen_length, lambda: generate(model, vocab, prompt=prompt, length=args.gen_length),
                            args.repeats)
        refeed = best_rate(args.refeed_length, lambda: generate_refeed(model, vocab, prompt=prompt,
                                                                       length=args.refeed_length, window=100), args.repeats)
        row("(b) generation, carried state, batch 1", carried, refeed, ">= 10x re-feeding")
        row("(b) generation, re-feeding a 100-char window, batch 1", refeed)

        # (c) batched generation
        for n in (1, 16, 64):
            rate = best_rate(n * args.gen_length, lambda: generate(model, vocab, prompt=prompt, length=args.gen_length,
                                                                   num_samples=n), args.repeats)
            row(f"(c) generation, batch {n}", rate, None if n == 1 else carried)

        # (d) the published model on CUDA: fp32, TF32, bf16 autocast
        if torch.cuda.is_available():
            big = make_shards(tmp / "big", vocab, args.steps * 256, 100)
            for batch in (64, 256):
                for name, precision, tf32 in (("fp32", "fp32", False), ("TF32", "fp32", True), ("bf16", "bf16", True)):
                    speeds = []
                    dcfg = TrainConfig(batch_size=batch, epochs=1, max_steps=args.steps, log_every_steps=5,
                                       checkpoint_every_steps=0, early_stopping_patience=None, device=str(device),
                                       precision=precision, allow_tf32=tf32, max_val_windows=64)
                    train(model_config=ModelConfig(), train_config=dcfg, shards_dir=big, vocab=vocab,
                          out_dir=tmp / f"d-{batch}-{name}", callbacks=TrainCallbacks(on_log=lambda m: speeds.append(m["chars_per_s"])))
                    row(f"(d) published model (9.3M), batch {batch}, {name} (median after warm-up)",
                        statistics.median(speeds[1:]))
        else:
            rows.append("| (d) published model on CUDA | no CUDA device here | | | |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
