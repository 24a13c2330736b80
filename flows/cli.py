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
                keys[f"{corpus} windows"] = f"{splits['train']['windows']} train / {splits['val']['windows']} val, oov {splits['oov_rate']:.4%}"
        for key, value in keys.items():
            if key not in ("vocab_fingerprint",):
                lines.append(f"    {key}: {value:.4f}" if isinstance(value, float) else f"    {key}: {value}")
    lines.append(f"done in {seconds:.1f}s; artifact root {data_root()}")
    return "\n".join(lines)


def _run(fn, refs_of, *args) -> None:
    started = time.monotonic()
    try:
        result = fn(*args)
    except Exception as exc:  # the flow already logged the traceback; say what failed in one line
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(summarise(refs_of(result), time.monotonic() - started))


def _apply_data_dir(data_dir: Optional[Path]) -> None:
    if data_dir:
        os.environ["HOMER_DATA_DIR"] = str(Path(data_dir).absolute())


@app.command()
def run(profile: str = ProfileOpt, config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt, data_dir: Optional[Path] = DataDirOpt) -> None:
    """Run the whole pipeline."""
    from flows.pipeline import homer_pipeline

    cfg = _config(profile, config, set_)
    _apply_data_dir(data_dir)
    _run(homer_pipeline, lambda refs: refs, cfg, str(data_root()))


STAGES = ("ingest-wikipedia", "ingest-simpsons", "prepare")


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
    given = dict(item.split("=", 1) for item in (input_ or []) if "=" in item)
    if name == "ingest-wikipedia":
        from flows.ingest_wikipedia import ingest_wikipedia as fn
        args = (cfg.wikipedia, root)
    elif name == "ingest-simpsons":
        from flows.ingest_simpsons import ingest_simpsons as fn
        args = (cfg.simpsons, root)
    else:
        from flows.prepare import prepare as fn
        args = (cfg.prepare, given.get("ingest-wikipedia"), given.get("ingest-simpsons"), root)
    _run(fn, lambda ref: {name: ref}, *args)


@app.command("config")
def show_config(profile: str = ProfileOpt, config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Print the resolved config (defaults < profile < file < --set)."""
    cfg = _config(profile, config, set_).model_dump(mode="json")
    typer.echo(json.dumps(cfg, indent=2) if as_json else yaml.safe_dump(cfg, sort_keys=False))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
