"""The `homer` command line: run the pipeline or one stage, generate text, serve deployments.

    homer run --profile sample
    homer stage prepare --set prepare.seq_len=50
    homer config --profile sample            # print the resolved config as YAML
    homer generate --checkpoint latest --prompt "Marge, " --num-samples 3
    homer serve                              # every deployment from one process
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
import yaml

from flows.config import ConfigError, PipelineConfig, load_config
from model.store import StageRef, data_root, read_manifest

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Teach a character-level RNN to talk like Homer Simpson.")

ProfileOpt = typer.Option("default", "--profile", "-p", help="default (the published recipe) or sample (bundled data, small model)")
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML file with config overrides")
SetOpt = typer.Option(None, "--set", "-s", help="override one field: dotted.key=value (repeatable)")
DataDirOpt = typer.Option(None, "--data-dir", help="artifact root (default: $HOMER_DATA_DIR or ./data)")


def _config(profile: str, config: Optional[Path], sets: Optional[List[str]]) -> PipelineConfig:
    try:
        return load_config(profile, config, sets or [])
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def summarise(refs: dict[str, StageRef], seconds: float) -> str:
    """One screen: each stage's output, its size and its key counts."""
    lines = []
    for stage, ref in refs.items():
        manifest = read_manifest(ref.dir)
        counts, metrics = manifest.get("counts", {}), manifest.get("metrics", {})
        lines.append(f"{stage:<17} {ref.path}  ({_human(_size(ref.dir))})")
        keys = {**{k: v for k, v in counts.items() if not isinstance(v, dict)}, **metrics}
        if "shards" in counts:
            for corpus, splits in counts["shards"].items():
                keys[f"{corpus} windows"] = (f"{splits['train']['windows']} train / {splits['val']['windows']} val / "
                                             f"{splits['test']['windows']} test, oov {splits['oov_rate']:.4%}")
        for key, value in keys.items():
            if key not in ("vocab_fingerprint",):
                lines.append(f"    {key}: {value:.4f}" if isinstance(value, float) else f"    {key}: {value}")
    lines.append(f"done in {seconds:.1f}s; artifact root {data_root()}")
    return "\n".join(lines)


def _run(fn, refs_of, *args):
    started = time.monotonic()
    try:
        result = fn(*args)
    except Exception as exc:  # the flow already logged the traceback; say what failed in one line
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(summarise(refs_of(result), time.monotonic() - started))
    return result


def _apply_data_dir(data_dir: Optional[Path]) -> None:
    if data_dir:
        os.environ["HOMER_DATA_DIR"] = str(Path(data_dir).absolute())


@app.command()
def run(profile: str = ProfileOpt, config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt, data_dir: Optional[Path] = DataDirOpt) -> None:
    """Run the whole pipeline."""
    from flows.pipeline import homer_pipeline

    cfg = _config(profile, config, set_)
    _apply_data_dir(data_dir)
    refs = _run(homer_pipeline, lambda refs: refs, cfg, str(data_root()))
    samples = json.loads((refs["report"].dir / "samples.json").read_text(encoding="utf-8"))
    typer.echo(f"\ngenerated lines (prompt {cfg.report.prompt!r}):")
    for temperature, texts in samples.items():
        for text in texts:
            typer.echo(f"  [t={temperature}] {' / '.join(text.splitlines())}")


STAGES = ("ingest-wikipedia", "ingest-simpsons", "prepare", "pretrain", "finetune", "report")
UPSTREAM = {  # the inputs each stage takes with --input
    "ingest-wikipedia": (), "ingest-simpsons": (), "prepare": ("ingest-wikipedia", "ingest-simpsons"),
    "pretrain": ("prepare",), "finetune": ("prepare", "pretrain"), "report": ("prepare", "pretrain", "finetune"),
}


def _inputs(stage: str, items: List[str]) -> dict[str, str]:
    """--input STAGE=FINGERPRINT|PATH items, checked against what the stage takes."""
    given, problems = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not value:
            problems.append(f"--input {item!r}: expected STAGE=FINGERPRINT|PATH")
        elif key not in UPSTREAM[stage]:
            problems.append(f"--input {item!r}: {stage} takes {', '.join(UPSTREAM[stage]) or 'no inputs'}")
        else:
            given[key] = value
    if problems:
        typer.echo("error: " + "\n  ".join(problems), err=True)
        raise typer.Exit(2)
    return given


@app.command()
def stage(
    name: str = typer.Argument(..., help=f"one of: {', '.join(STAGES)}"),
    profile: str = ProfileOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    data_dir: Optional[Path] = DataDirOpt,
    input_: Optional[List[str]] = typer.Option(None, "--input", "-i", help="upstream output: stage=FINGERPRINT|PATH (default: that stage's latest)"),
) -> None:
    """Run one stage on the latest outputs of the stages before it."""
    if name not in STAGES:
        typer.echo(f"error: unknown stage {name!r}; choose one of {', '.join(STAGES)}", err=True)
        raise typer.Exit(2)
    cfg = _config(profile, config, set_)
    _apply_data_dir(data_dir)
    root = str(data_root())
    given = _inputs(name, input_ or [])
    if name == "ingest-wikipedia":
        from flows.ingest_wikipedia import ingest_wikipedia as fn
        args = (cfg.wikipedia, root)
    elif name == "ingest-simpsons":
        from flows.ingest_simpsons import ingest_simpsons as fn
        args = (cfg.simpsons, root)
    elif name == "prepare":
        from flows.prepare import prepare as fn
        args = (cfg.prepare, given.get("ingest-wikipedia"), given.get("ingest-simpsons"), root)
    elif name == "pretrain":
        from flows.pretrain import pretrain as fn
        args = (cfg.pretrain, given.get("prepare"), root)
    elif name == "finetune":
        from flows.finetune import finetune as fn
        args = (cfg.finetune, given.get("prepare"), given.get("pretrain"), root)
    else:
        from flows.report import report as fn
        args = (cfg.report, given.get("prepare"), given.get("pretrain"), given.get("finetune"), root)
    ref = _run(fn, lambda ref: {name: ref}, *args)
    if name == "report":
        typer.echo("\n" + (ref.dir / "report.md").read_text(encoding="utf-8"))


@app.command()
def generate(
    checkpoint: str = typer.Option("latest", help="'latest' (newest finetune, else pretrain), a fingerprint or a checkpoint directory"),
    prompt: str = typer.Option("Marge, ", help="text the samples continue"),
    length: int = typer.Option(200, help="characters to generate per sample"),
    temperature: float = typer.Option(0.8, help="softmax temperature"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="sample from the k most likely characters"),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="nucleus sampling threshold"),
    num_samples: int = typer.Option(3, "--num-samples", "-n", help="samples, generated as one batch"),
    greedy: bool = typer.Option(False, help="always take the most likely character"),
    beam_width: Optional[int] = typer.Option(None, "--beam-width", help="beam search with this many beams"),
    seed: int = typer.Option(0, help="random seed"),
    data_dir: Optional[Path] = DataDirOpt,
    as_json: bool = typer.Option(False, "--json", help="print the samples as a JSON list"),
) -> None:
    """Generate text from a checkpoint (no Prefect server needed)."""
    from pydantic import ValidationError

    from flows.config import GenerateConfig, format_errors
    from flows.generate import sample

    _apply_data_dir(data_dir)
    try:
        cfg = GenerateConfig(checkpoint=checkpoint, prompt=prompt, length=length, temperature=temperature, top_k=top_k,
                             top_p=top_p, num_samples=num_samples, greedy=greedy, beam_width=beam_width, seed=seed)
    except ValidationError as exc:
        typer.echo(f"error: {format_errors(exc, 'options')}", err=True)
        raise typer.Exit(2) from None
    try:
        path, texts = sample(cfg, data_root())
    except Exception as exc:
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(texts, ensure_ascii=False, indent=1))
        return
    typer.echo(f"# {len(texts)} sample(s) from {path}")
    for i, text in enumerate(texts, 1):
        typer.echo(f"--- sample {i}\n{text}")


@app.command()
def serve(
    profile: str = ProfileOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    cron: Optional[str] = typer.Option(None, help="schedule of the full pipeline (default: prefect.yaml's weekly cron)"),
) -> None:
    """Serve every deployment from this one process (no work pool needed)."""
    from flows.serve import serve_all

    serve_all(_config(profile, config, set_), cron=cron)


@app.command("config")
def show_config(profile: str = ProfileOpt, config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Print the resolved config (defaults < profile < file < --set)."""
    cfg = _config(profile, config, set_).model_dump(mode="json")
    typer.echo(json.dumps(cfg, indent=2) if as_json else yaml.safe_dump(cfg, sort_keys=False))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
