"""Evaluation and the report: bits per character on held-out text, samples, loss curves.

    python -m model.report   # (used through the `report` stage; see flows/report.py)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and workers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from model.checkpoint import load_model_from_checkpoint  # noqa: E402
from model.train import evaluate, read_windows, resolve_device  # noqa: E402


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_losses(runs: dict[str, Path], out_png: Path) -> Path:
    """Training and validation loss (nats/char) against step, one colour per run."""
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    offset = 0
    for (name, path), colour in zip(runs.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        entries = read_metrics(path)
        logs = [(e["step"] + offset, e["loss"]) for e in entries if e.get("kind") == "log"]
        evals = [(e["step"] + offset, e["val_loss"]) for e in entries if e.get("kind") == "eval"]
        if logs:
            ax.plot(*zip(*logs), color=colour, alpha=0.6, label=f"{name} train")
        if evals:
            ax.plot(*zip(*evals), "o-", color=colour, label=f"{name} validation")
        offset = max([offset] + [s for s, _ in logs + evals])
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/char)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(out_png).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_png)
    return Path(out_png)


def bits_per_char(checkpoint: Path, shards_dir: Path, device: str = "auto", batch_size: int = 64,
                  max_windows: int | None = None) -> dict:
    """Loss of a checkpoint on a validation split: nats/char, bits/char, perplexity."""
    model, vocab, _ = load_model_from_checkpoint(checkpoint, resolve_device(device))
    windows = read_windows(shards_dir, "val", vocab)
    if max_windows and len(windows) > max_windows:
        windows = windows[np.linspace(0, len(windows) - 1, max_windows).round().astype(np.int64)]
    nats = evaluate(model, windows, batch_size=batch_size, device=next(model.parameters()).device)
    return {"nats_per_char": nats, "bits_per_char": nats / math.log(2), "perplexity": math.exp(nats), "windows": len(windows)}


def render_report(scores: list[dict], samples: dict[float, list[str]], prompt: str, png_name: str) -> str:
    lines = ["# recurrent-homer report", "", "## Held-out bits per character", "",
             "| model | corpus | bits/char | nats/char | perplexity | windows |", "| --- | --- | --- | --- | --- | --- |"]
    for s in scores:
        lines.append(f"| {s['model']} | {s['corpus']} | {s['bits_per_char']:.4f} | {s['nats_per_char']:.4f} | "
                     f"{s['perplexity']:.3f} | {s['windows']} |")
    lines += ["", "Validation text is held out by document: no validation document is seen in training.", "",
              f"## Samples of the fine-tuned model (prompt {prompt!r})", ""]
    for temperature, texts in samples.items():
        lines.append(f"### temperature {temperature}")
        lines.append("")
        for text in texts:
            lines += ["```", text, "```", ""]
    lines += ["## Loss curves", "", f"![loss curves]({png_name})", ""]
    return "\n".join(lines)
