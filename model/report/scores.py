"""Evaluation and the report: bits per character on held-out text, samples, loss curves.

Whatever the tokenizer (char, word, bpe), a figure is bits per character: the summed loss of
the scored targets over the characters of text they cover (the shards' `target_chars` for
word and BPE; one per target for char), so one table compares tokenizers fairly.

    homer stage report --profile sample   # the `report` stage (flows/report.py) runs this module
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and workers
import matplotlib.pyplot as plt  # noqa: E402

from model.network.checkpoint import load_model_from_checkpoint  # noqa: E402
from model.data.shards import read_overlap, read_target_chars  # noqa: E402
from model.training.loop import evaluate, read_windows, resolve_device, scored_chars, scored_targets  # noqa: E402

HEADLINE_SPLIT = "test"  # never read in training, never chose a model
EVAL_SPLITS = ("test", "val")


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_losses(runs: dict[str, Path], out_png: Path) -> Path:
    """Training and validation loss against step, one colour per run (nats per token in training, per character in
    validation: the same for the char tokenizer)."""
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
    ax.set_ylabel("loss (train: nats/token, validation: nats/char)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(out_png).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_png)
    return Path(out_png)


def bits_per_char(checkpoint: Path, shards_dir: Path, split: str = HEADLINE_SPLIT, device: str = "auto",
                  batch_size: int = 64) -> dict:
    """Loss of a checkpoint on one split, every token scored once, per character of the text scored.

    Returns nats/char, bits/char, perplexity (per character), the windows read, `chars`: the
    exact number of characters the figure covers, `tokens`: the targets scored, and the tokenizer.
    """
    model, vocab, _ = load_model_from_checkpoint(checkpoint, resolve_device(device))
    windows, overlap = read_windows(shards_dir, split, vocab), read_overlap(shards_dir, split)
    target_chars = read_target_chars(shards_dir, split)  # None for character shards
    nats = evaluate(model, windows, batch_size=batch_size, device=next(model.parameters()).device, overlap=overlap,
                    target_chars=target_chars)
    return {"nats_per_char": nats, "bits_per_char": nats / math.log(2), "perplexity": math.exp(nats),
            "windows": len(windows), "chars": scored_chars(windows, overlap, target_chars),
            "tokens": scored_targets(windows, overlap), "tokenizer": vocab.kind}


def render_report(scores: list[dict], samples: dict[float, list[str]], prompt: str, png_name: str,
                  provenance: list[str] | None = None) -> str:
    """The report as markdown; `scores` has one row per (model, corpus) with `test` and `val` results."""
    lines = ["# recurrent-homer report", "", "## Bits per character on held-out text", "",
             "| model | corpus | tokenizer | test bits/char | test chars | test tokens/char | val bits/char | val chars "
             "| test nats/char | test perplexity |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in scores:
        test, val = s["test"], s["val"]
        tokens = test.get("tokens", test["chars"])  # rows made before tokenizers: characters
        lines.append(f"| {s['model']} | {s['corpus']} | {test.get('tokenizer', 'char')} | {test['bits_per_char']:.4f} | "
                     f"{test['chars']:,} | {tokens / max(test['chars'], 1):.3f} | {val['bits_per_char']:.4f} | {val['chars']:,} | "
                     f"{test['nats_per_char']:.4f} | {test['perplexity']:.3f} |")
    lines += ["", "Documents are split three ways by a hash of their id. Validation chose `best/` and early stopping; "
              "test was never read in training, so the test column is the honest figure. Every token of a split "
              "is scored once (a document's first token is context only), and every figure is per character: the "
              "summed loss over the characters of text the scored tokens cover (for words, from the end of the word "
              "before, so spaces count), so tokenizers compare fairly.", ""]
    if provenance:
        lines += ["## What was compared", "", *[f"- {p}" for p in provenance], ""]
    lengths = "characters" if not scores or scores[0]["test"].get("tokenizer", "char") == "char" else "tokens"
    lines += [f"## Samples of the fine-tuned model (prompt {prompt!r}; lengths in {lengths})", ""]
    for temperature, texts in samples.items():
        lines.append(f"### temperature {temperature}")
        lines.append("")
        for text in texts:
            lines += ["```", text, "```", ""]
    lines += ["## Loss curves", "", f"![loss curves]({png_name})", ""]
    return "\n".join(lines)
