"""Shared task plumbing: input-keyed cache keys and Prefect artifacts for stage outputs.

A stage task's cache key is its output fingerprint, and only while that output is
complete on disk: Prefect shows a re-run as Cached, and a deleted output is rebuilt.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from model.data.sources import source_stamp
from model.store.outputs import StageRef, data_root, fingerprint, is_complete, output_dir, set_latest
from tasks.artifacts import location_markdown
from tasks.stages import STAGES


def stage_fingerprint(stage: str, config: Any, inputs: dict[str, StageRef] | None = None) -> str:
    """The output's name: stage, config, inputs' fingerprints, code version (and, for ingests, the source files)."""
    keys = {k: v.fingerprint for k, v in (inputs or {}).items()}
    if stage.startswith("ingest-") and (stamp := source_stamp(config)):
        keys["source-files"] = stamp
    return fingerprint(stage, config, keys, STAGES[stage].code_version)


def complete_ref(root: Path, stage: str, fp: str) -> StageRef | None:
    """The ref of a complete output with this fingerprint, or None (run_stage_task updates latest)."""
    out = output_dir(root, stage, fp)
    return StageRef(stage=stage, fingerprint=fp, path=str(out)) if is_complete(out) else None


def stage_cache_key(stage: str):
    """A cache_key_fn: the stage's output fingerprint (and root), so same inputs hit the cache."""

    def key(_context, parameters: dict) -> str:
        root = data_root(parameters.get("root"))
        fp = stage_fingerprint(stage, parameters["config"], parameters.get("inputs"))
        return f"{stage}-{fp}-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"

    return key


def run_stage_task(stage_task, stage: str, config: Any, inputs: dict[str, StageRef] | None, root: str, **options):
    """Call a stage task, refreshing its cache entry when the output is not complete on disk.

    A complete output shows as Cached in Prefect; a deleted or never-finished one is
    rebuilt instead of being served from a stale cache record.
    """
    fp = stage_fingerprint(stage, config, inputs)
    complete = is_complete(output_dir(data_root(root), stage, fp))
    task = stage_task.with_options(refresh_cache=not complete)
    kwargs = {"config": config, "root": root}
    if inputs is not None:
        kwargs["inputs"] = inputs
    result = task(**kwargs, **options)
    if is_complete(output_dir(data_root(root), stage, fp)):
        set_latest(data_root(root), stage, fp)  # a Cached task never ran its body, which sets latest too
    return result


def artifact_key(*parts: str) -> str:
    """Dash-case, stable artifact keys: homer-<stage>-<what>."""
    return "-".join(["homer", *parts]).replace("_", "-").lower()


def publish_counts(stage: str, ref: StageRef, rows: list[dict], description: str) -> None:
    create_markdown_artifact(key=artifact_key(stage, "output"), markdown=location_markdown(f"{stage} output", ref.path, ref.fingerprint),
                             description=f"{stage} output directory")
    create_table_artifact(key=artifact_key(stage, "counts"), table=rows, description=description)


def flatten(counts: dict, prefix: str = "") -> list[dict]:
    """{'a': {'b': 1}} -> [{'metric': 'a.b', 'value': 1}] for table artifacts."""
    rows = []
    for key, value in counts.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(flatten(value, name + "."))
        else:
            rows.append({"metric": name, "value": round(value, 6) if isinstance(value, float) else value})
    return rows
