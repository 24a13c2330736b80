"""The `homer` command line: run the pipeline or one stage, generate text, serve deployments.

    homer run --profile sample
    homer stage prepare --set prepare.seq_len=50
    homer config --profile sample            # print the resolved config as YAML
    homer generate --checkpoint latest --prompt "Marge, " --num-samples 3
    homer serve                              # every deployment from one process
    homer sweep pretrain --profile sample --trials 8 --parallel 2   # tune a stage (flows/sweep.py)
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

# A cold temporary server (first run, migrations, a busy 2-core machine) can take longer than Prefect's 20 s.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from flows.config import ConfigError, GenerateConfig, PipelineConfig, load_config
from model.store.outputs import StageRef, data_root, read_manifest, root_name
from tasks.stages import STAGES

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Teach a character-level RNN to talk like Homer Simpson.")

ProfileOpt = typer.Option("default", "--profile", "-p", help="default (the published recipe, for a GPU), cpu (a few MB, about 30 min on a laptop CPU) or sample (bundled data, small model)")
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML file with config overrides")
SetOpt = typer.Option(None, "--set", "-s", help="override one field: dotted.key=value (repeatable)")
DataDirOpt = typer.Option(None, "--data-dir", help="artifact root: a path, or s3://, gs://, az:// (default: $HOMER_DATA_DIR or ./data)")


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
    lines.append(f"done in {seconds:.1f}s; artifact root {root_name(data_root())}")
    return "\n".join(lines)


VERBOSE = {"on": False}


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", "-v", help="print tracebacks of failures (they are always in the Prefect run's logs)")) -> None:
    VERBOSE["on"] = verbose
    if not verbose:
        _quiet_console()


class _NoFailureNoise:
    """A console filter: failures are said once, by the CLI's `error:` line; the run's logs keep the traceback."""

    def filter(self, record) -> bool:
        if record.levelno >= 40:  # ERROR: "Encountered exception ..." with its traceback
            return False
        return not record.getMessage().startswith("Finished in state Failed")


def _quiet_console() -> None:
    import logging

    import prefect.main  # noqa: F401  (configures Prefect's logging now, so its console handlers exist; later set-ups are incremental)
    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler) and not any(isinstance(f, _NoFailureNoise) for f in handler.filters):
                handler.addFilter(_NoFailureNoise())


def fail(exc: BaseException, code: int = 1):
    """Print one `error:` line for a failure (and the traceback with --verbose), then exit with `code`."""
    import traceback

    if VERBOSE["on"]:
        traceback.print_exception(exc)
    ours = type(exc).__module__.split(".")[0] in ("model", "flows", "tasks")
    message = " ".join(str(exc).split()) if ours else f"{type(exc).__name__}: {exc}"
    hint = "" if VERBOSE["on"] or ours else " (run with --verbose for the traceback)"
    typer.echo(f"error: {message}{hint}", err=True)
    raise typer.Exit(code) from None


def interrupted(exc: BaseException):
    """Training stopped on request (Ctrl-C, SIGTERM): one line with the command that resumes it; 128 + the signal."""
    import shlex
    import signal

    from tasks.train import STOPPED_BY

    signum = STOPPED_BY["signal"] or signal.SIGINT
    typer.echo(f"{exc}; `homer {shlex.join(sys.argv[1:])}` resumes", err=True)
    raise typer.Exit(128 + int(signum)) from None


def _run(fn, refs_of, *args, **kwargs):
    from flows.local_server import temporary_server

    started = time.monotonic()
    try:
        with temporary_server():  # with no PREFECT_API_URL: one that dies with this process, even by SIGKILL
            result = fn(*args, **kwargs)
    except Exception as exc:
        from prefect.exceptions import CancelledRun

        if isinstance(exc, CancelledRun):
            interrupted(exc)
        fail(exc)
    typer.echo(summarise(refs_of(result), time.monotonic() - started))
    return result


def _apply_data_dir(data_dir: Optional[str]) -> None:
    """--data-dir: a path (made absolute: flow runs may work elsewhere) or a store's URL, as it is."""
    if data_dir:
        os.environ["HOMER_DATA_DIR"] = data_dir if "://" in data_dir else str(Path(data_dir).absolute())


@app.command()
def run(profile: str = ProfileOpt, config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt, data_dir: Optional[str] = DataDirOpt) -> None:
    """Run the whole pipeline."""
    from flows.pipeline import homer_pipeline

    cfg = _config(profile, config, set_)
    _apply_data_dir(data_dir)
    refs = _run(homer_pipeline, lambda refs: refs, cfg, root_name(data_root()))
    samples = json.loads((refs["report"].dir / "samples.json").read_text(encoding="utf-8"))
    typer.echo(f"\ngenerated lines (prompt {cfg.report.prompt!r}):")
    for temperature, texts in samples.items():
        for text in texts:
            typer.echo(f"  [t={temperature}] {' / '.join(text.splitlines())}")


def _inputs(stage: str, items: List[str]) -> dict[str, str]:
    """--input STAGE=FINGERPRINT|PATH items -> the flow's parameters, checked against what the stage takes."""
    takes = {upstream: param for param, upstream in STAGES[stage].inputs.items()}
    given, problems = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not value:
            problems.append(f"--input {item!r}: expected STAGE=FINGERPRINT|PATH")
        elif key not in takes:
            problems.append(f"--input {item!r}: {stage} takes {', '.join(takes) or 'no inputs'}")
        else:
            given[takes[key]] = value
    if problems:
        typer.echo("error: " + "\n  ".join(problems), err=True)
        raise typer.Exit(2)
    return given


@app.command()
def stage(
    name: str = typer.Argument(..., help=f"one of: {', '.join(STAGES)}"),
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="start from this profile (default, cpu, sample) instead of "
                                          "the config of the stage's latest output"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    data_dir: Optional[str] = DataDirOpt,
    input_: Optional[List[str]] = typer.Option(None, "--input", "-i", help="upstream output: stage=FINGERPRINT|PATH (default: that stage's latest)"),
) -> None:
    """Run one stage on the latest outputs of the stages before it."""
    if name not in STAGES:
        typer.echo(f"error: unknown stage {name!r}; choose one of {', '.join(STAGES)}", err=True)
        raise typer.Exit(2)
    cfg = _config(profile or "default", config, set_)
    _apply_data_dir(data_dir)
    spec = STAGES[name]
    given = _inputs(name, input_ or [])
    # Like last time, with these changes: the stage's latest config, unless a profile was asked for.
    start_from = "config" if profile else "latest"
    from flows.config import stage_config

    try:
        _, origin = stage_config(data_root(), name, getattr(cfg, spec.section), start_from)
    except Exception as exc:
        fail(exc)
    typer.echo(f"{name}: starting from {origin}")
    ref = _run(spec.load_flow(), lambda ref: {name: ref}, getattr(cfg, spec.section), **given, data_dir=root_name(data_root()),
               start_from=start_from)
    if name == "report":
        typer.echo("\n" + (ref.dir / "report.md").read_text(encoding="utf-8"))


def options_from(model_cls, short: dict[str, str] | None = None):
    """A decorator giving a command one --option per field of a pydantic model (default and help from the field).

    The settings are declared once, in the model; the command receives them as `settings`,
    a dict of the options given, and validates them with the model.
    """
    import inspect
    import typing

    short = short or {}

    def decorate(fn):
        hints = typing.get_type_hints(fn)  # the real types: this module's annotations are strings
        own = [p.replace(annotation=hints[p.name]) for p in inspect.signature(fn).parameters.values() if p.name != "settings"]
        fields = []
        for name, field in model_cls.model_fields.items():
            flag = "--" + name.replace("_", "-")
            decls = [flag, short[name]] if name in short else [flag]
            if field.annotation is bool:
                decls = [f"{flag}/--no-{flag[2:]}"]
            fields.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=field.annotation,
                                            default=typer.Option(field.default, *decls, help=field.description)))

        def command(**kwargs):
            settings = {name: kwargs.pop(name) for name in model_cls.model_fields}
            return fn(settings=settings, **kwargs)

        command.__signature__ = inspect.Signature(fields + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own])
        command.__doc__, command.__name__ = fn.__doc__, fn.__name__
        return command

    return decorate


@app.command()
@options_from(GenerateConfig, short={"num_samples": "-n"})
def generate(
    settings: dict,
    data_dir: Optional[str] = DataDirOpt,
    as_json: bool = typer.Option(False, "--json", help="print the samples as a JSON list"),
) -> None:
    """Generate text from a checkpoint (no Prefect server needed)."""
    from pydantic import ValidationError

    from flows.config import format_errors
    from flows.generate import sample

    _apply_data_dir(data_dir)
    try:
        cfg = GenerateConfig(**settings)
    except ValidationError as exc:
        typer.echo(f"error: {format_errors(exc, 'options')}", err=True)
        raise typer.Exit(2) from None
    try:
        path, texts = sample(cfg, data_root())
    except Exception as exc:
        fail(exc)
    if as_json:
        typer.echo(json.dumps(texts, ensure_ascii=False, indent=1))
        return
    typer.echo(f"# {len(texts)} sample(s) from {path}")
    for i, text in enumerate(texts, 1):
        typer.echo(f"--- sample {i}\n{text}")


@app.command()
def verify(
    stages: Optional[List[str]] = typer.Argument(None, help=f"stages to check (default: all): {', '.join(STAGES)}", show_default=False),
    data_dir: Optional[str] = DataDirOpt,
    sizes_only: bool = typer.Option(False, "--sizes-only", help="check each listed file's size only, not its checksum"),
) -> None:
    """Check every output of the stages against its manifest (sizes and checksums); exit 1 if one is damaged."""
    from model.store.outputs import verify_stage

    unknown = [name for name in stages or [] if name not in STAGES]
    if unknown:
        typer.echo(f"error: unknown stage(s) {', '.join(map(repr, unknown))}; choose from {', '.join(STAGES)}", err=True)
        raise typer.Exit(2)
    _apply_data_dir(data_dir)
    root, damaged = data_root(), 0
    for name in stages or list(STAGES):
        rows = verify_stage(root, name, checksums=not sizes_only)
        if not rows:
            typer.echo(f"{'none':<10} {name}: no outputs under {root / name}")
        for state, path, detail in rows:
            damaged += state == "damaged"
            typer.echo(f"{state:<10} {name}/{path.name}: {detail}")
    if damaged:
        typer.echo(f"error: {damaged} damaged output(s); re-run the stage named on each line to rebuild it", err=True)
        raise typer.Exit(1)


@app.command()
def gc(
    data_dir: Optional[str] = DataDirOpt,
    remove: bool = typer.Option(False, "--remove", help="delete what is listed (default: only list it)"),
    grace_hours: float = typer.Option(1.0, "--grace-hours", help="younger unfinished outputs may be a writer at work: kept"),
) -> None:
    """List (or --remove) outputs no one needs: incomplete or damaged ones, leftovers, and those no `latest` reaches."""
    from model.store.remote import gc as collect

    _apply_data_dir(data_dir)
    root = root_name(data_root())
    try:
        rows = collect(root, remove=remove, grace_s=grace_hours * 3600, stages=list(STAGES))
    except Exception as exc:
        fail(exc)
    for where, reason in rows:
        typer.echo(f"{'removed' if remove and not reason.startswith('in progress') else 'unneeded':<9} {where}: {reason}")
    typer.echo(f"{len(rows)} item(s) under {root}" + ("" if remove else "; run `homer gc --remove` to delete them"))


# ---- homer sweep (flows/sweep.py) -------------------------------------------------------------

def _sweep_help(field: str) -> str:
    from model.training.sweep import SweepConfig

    return SweepConfig.model_fields[field].description


@app.command()
def sweep(
    stage_name: str = typer.Argument("pretrain", metavar="[STAGE]", help="the stage to tune: pretrain (the default) or finetune"),
    trials: int = typer.Option(10, "--trials", "-n", help=_sweep_help("trials")),
    parallel: int = typer.Option(1, "--parallel", "-k", help=_sweep_help("parallel")),
    space: Optional[Path] = typer.Option(None, "--space", help="YAML: {dotted.config.field: {low, high, log, step} or "
                                         "{choices: [...]}}; default: the stage's default space (see the README)"),
    storage: Optional[str] = typer.Option(None, "--storage", help=_sweep_help("storage")),
    study: Optional[str] = typer.Option(None, "--study", help=_sweep_help("study")),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="also write the best trial's config (YAML for --config) here"),
    profile: str = ProfileOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    data_dir: Optional[str] = DataDirOpt,
) -> None:
    """Tune a training stage: N trials (Optuna), K at once, weak ones pruned; the best config is written as YAML."""
    from pydantic import ValidationError

    from flows.config import format_errors
    from flows.sweep import homer_sweep, load_space_file
    from model.training.sweep import SpaceError, SweepConfig

    if stage_name not in ("pretrain", "finetune"):
        typer.echo(f"error: a sweep tunes pretrain or finetune, not {stage_name!r}", err=True)
        raise typer.Exit(2)
    cfg = _config(profile, config, set_)
    try:
        settings = SweepConfig(trials=trials, parallel=parallel, storage=storage, study=study)
        space_data = load_space_file(stage_name, cfg, space) if space else None
    except ValidationError as exc:
        typer.echo(f"error: {format_errors(exc, 'options')}", err=True)
        raise typer.Exit(2) from None
    except SpaceError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    _apply_data_dir(data_dir)

    def best_ref(summary: dict) -> dict[str, StageRef]:
        best = summary["best"]
        if not best or not best.get("fingerprint"):
            return {}
        return {f"{stage_name} (best trial)": StageRef(stage=stage_name, fingerprint=best["fingerprint"], path=best["output"])}

    summary = _run(homer_sweep, best_ref, stage_name, cfg, settings, space_data, root_name(data_root()))
    typer.echo(f"study {summary['study']} ({summary['storage']}): {summary['trials']} trial(s), this run "
               f"{', '.join(map(str, summary['this_run']))}; results in {summary['folder']}")
    if summary["best"] is None:
        typer.echo("no trial has finished yet: no best config", err=True)
        return
    best = summary["best"]
    typer.echo(f"best: trial {best['number']}, {best['value']:.4f} bits/char: "
               + ", ".join(f"{k}={v}" for k, v in best["params"].items()))
    typer.echo(f"best config: {summary['best_config']}")
    if out:
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(Path(summary["best_config"]).read_text(encoding="utf-8"), encoding="utf-8")
        os.replace(tmp, out)
        typer.echo(f"best config also in {out}")


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


@app.command("stages")
def show_stages() -> None:
    """Print the stages, their inputs and deployments as a markdown table (the README's)."""
    from tasks.stages import deployments_table

    typer.echo(deployments_table())


@app.command("config")
def show_config(profile: str = ProfileOpt, config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Print the resolved config (defaults < profile < file < --set)."""
    cfg = _config(profile, config, set_).model_dump(mode="json")
    typer.echo(json.dumps(cfg, indent=2) if as_json else yaml.safe_dump(cfg, sort_keys=False))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
