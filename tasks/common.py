"""Shared task plumbing: input-keyed cache keys and Prefect artifacts for stage outputs.

A stage task's cache key is its output fingerprint, and only while that output is
complete on disk (its manifest parses and every file it lists is there at its size):
Prefect shows a re-run as Cached, and a deleted or damaged output is rebuilt (a damaged
one is first moved aside to `<fp>.damaged-<time>`). Before a stage runs, its inputs'
checksums are checked, so it never builds on damaged data.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from model.data.sources import source_stamp
from model.store.outputs import (MANIFEST, StageRef, data_root, fingerprint, inspect_output, output_complete, output_dir,
                                 ref_for, remote_of, root_name, set_aside, set_latest, verify_output)
from tasks.artifacts import location_markdown
from tasks.stages import STAGES


def stage_fingerprint(stage: str, config: Any, inputs: dict[str, StageRef] | None = None) -> str:
    """The output's name: stage, config, inputs' fingerprints, code version (and, for ingests, the source files)."""
    keys = {k: v.fingerprint for k, v in (inputs or {}).items()}
    if stage.startswith("ingest-") and (stamp := source_stamp(config)):
        keys["source-files"] = stamp
    return fingerprint(stage, config, keys, STAGES[stage].code_version)


def _logger():
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow or task run
        return logging.getLogger("homer")


def complete_ref(root: Path, stage: str, fp: str) -> StageRef | None:
    """The ref of a complete output with this fingerprint, or None (run_stage_task updates latest).

    A damaged output (its manifest does not parse, or a file it lists is missing or of
    another size) is moved aside to `<fp>.damaged-<time>` so the stage rebuilds it.
    """
    remote = remote_of(root)
    if remote is not None:
        from model.store.remote import inspect_remote_output, set_aside_remote

        state, problems = inspect_remote_output(remote, stage, fp)
        if state == "complete":
            return ref_for(root, stage, fp)
        if state == "damaged" and (moved := set_aside_remote(remote, stage, fp)) is not None:
            _logger().warning("%s: the %s output is damaged; set its manifest aside to %s and rebuilding it", problems[0], stage, moved)
        return None
    out = output_dir(root, stage, fp)
    state, problems = inspect_output(out, checksums=False)
    if state == "complete":
        return StageRef(stage=stage, fingerprint=fp, path=str(out))
    if state == "damaged":
        moved = set_aside(out)
        if moved is not None:
            _logger().warning("%s: the %s output %s is damaged; moved it to %s and rebuilding it", problems[0], stage, out, moved)
    return None


def verify_inputs(inputs: dict[str, StageRef] | None) -> None:
    """Check the checksums of every input that is a stage output; a StoreError names a damaged file and its stage."""
    for ref in (inputs or {}).values():
        if isinstance(ref, StageRef) and (ref.dir / MANIFEST).is_file():  # a bare checkpoint has no manifest
            verify_output(ref.dir, ref.stage, checksums=True)


def stage_cache_key(stage: str):
    """A cache_key_fn: the stage's output fingerprint (and root), so same inputs hit the cache."""

    def key(_context, parameters: dict) -> str:
        root = root_name(data_root(parameters.get("root")))
        fp = stage_fingerprint(stage, parameters["config"], parameters.get("inputs"))
        return f"{stage}-{fp}-{hashlib.sha256(root.encode()).hexdigest()[:8]}"

    return key


def run_stage_task(stage_task, stage: str, config: Any, inputs: dict[str, StageRef] | None, root: str, **options):
    """Call a stage task, refreshing its cache entry when the output is not complete on disk.

    A complete output shows as Cached in Prefect; a deleted or never-finished one is
    rebuilt instead of being served from a stale cache record.
    """
    fp = stage_fingerprint(stage, config, inputs)
    complete = output_complete(data_root(root), stage, fp)
    if not complete:
        verify_inputs(inputs)  # it will read them: checksums, not only sizes
    task = stage_task.with_options(refresh_cache=not complete)
    kwargs = {"config": config, "root": root}
    if inputs is not None:
        kwargs["inputs"] = inputs
    result = task(**kwargs, **options)
    if output_complete(data_root(root), stage, fp):
        set_latest(data_root(root), stage, fp)  # a Cached task never ran its body, which sets latest too
        label_run_output(stage, fp)
    return result


OUTPUT_LABEL = "homer.output"  # a stage run's label: `<stage>/<fingerprint>` of the output it made or reused


def label_run_output(stage: str, fp: str) -> None:
    """Label this flow run with its output, so whoever started it (the pipeline on pools) reads this run's
    output, not the stage's `latest`, which a concurrent run of the stage may have moved since."""
    from prefect.runtime import flow_run

    if not flow_run.id:
        return
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            client.update_flow_run_labels(flow_run.id, {OUTPUT_LABEL: f"{stage}/{fp}"})
    except Exception as exc:  # the output is made; only the label is missing, and its reader says so
        _logger().warning("could not label the run with its %s output %s: %s", stage, fp, exc)


def labelled_output(labels: dict | None, stage: str) -> str | None:
    """The output fingerprint a finished run of `stage` labelled itself with (label_run_output), or None."""
    value = (labels or {}).get(OUTPUT_LABEL, "")
    labelled_stage, _, fp = str(value).rpartition("/")
    return fp if labelled_stage == stage and fp else None


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
