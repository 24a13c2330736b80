"""`homer_pipeline`: every stage in order, the two ingests at the same time.

    ingest_wikipedia ──┐
                       ├─> prepare ─> pretrain ─> finetune ─> report
    ingest_simpsons ───┘

Each stage reuses a complete output with the same fingerprint, so a second run with
the same config recomputes nothing and a changed parameter recomputes only its stage
and those after it.

Where the stages run (`stages_on`): `here` calls every stage flow as a subflow in this
run's process (one machine: `homer run`, `homer serve`); `pools` runs each stage as a
run of its own deployment (`<stage>/<stage>` from prefect.yaml), so the data stages go
to homer-pool's workers and training to homer-gpu's, and this run waits for each. With
`pools` the artifact root must be one every worker reaches (an object store), and a
stage's output is the one its run labelled itself with (`homer.output`), never the stage's
`latest`, which another pipeline may have moved meanwhile.

    homer run --profile sample
    prefect deployment run homer-pipeline/sample --param stages_on=pools
"""

from __future__ import annotations

import contextvars
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import CancelledRun
from prefect.states import Cancelled

from flows.config import PipelineConfig
from flows.naming import run_namer
from model.store.outputs import StageRef, check_writable, data_root, latest, output_complete, ref_for, root_name
from tasks.artifacts import pipeline_summary_markdown
from tasks.common import OUTPUT_LABEL, artifact_key, labelled_output
from tasks.stages import STAGES, Stage

StagesOn = Literal["here", "pools"]


def _in_thread(pool: ThreadPoolExecutor, fn, *args):
    # Each thread runs in a copy of this flow's context, so its flow is a child of this run.
    return pool.submit(contextvars.copy_context().run, fn, *args)


def run_on_pool(stage: Stage, config, root, inputs: dict[str, StageRef | None] | None = None) -> StageRef:
    """Run one stage as a run of its deployment (on that deployment's pool) and wait; returns its output.

    Inputs go by fingerprint (valid on every machine that reaches the root). The output is the one
    the run labelled itself with: the stage's `latest` may have moved since, by a concurrent run.
    """
    from prefect.deployments import run_deployment

    parameters = {"config": getattr(config, stage.section).model_dump(mode="json"), "data_dir": root_name(root),
                  "start_from": "config", **{param: ref.fingerprint if ref else None for param, ref in (inputs or {}).items()}}
    run = run_deployment(f"{stage.name}/{stage.name}", parameters=parameters, timeout=None, as_subflow=True)
    state = run.state
    if state is not None and state.is_cancelled():
        raise CancelledRun(f"the {stage.name} run {run.name} was cancelled")
    if state is None or not state.is_completed():
        raise RuntimeError(f"the {stage.name} stage's run {run.name} ({run.id}) on pool {stage.pool} ended "
                           f"{state.name if state else 'without a state'}: {state.message if state else ''}; see its logs in the UI")
    if fp := labelled_output(run.labels, stage.name):
        if not output_complete(root, stage.name, fp):
            raise RuntimeError(f"the {stage.name} run {run.name} ({run.id}) names its output {fp}, which is not complete "
                               f"in {root_name(root)}: re-run the pipeline, and `homer verify` the root")
        return ref_for(root, stage.name, fp)
    get_run_logger().warning("the %s run %s carries no %s label (a deployment of older code?): taking the stage's latest",
                             stage.name, run.name, OUTPUT_LABEL)
    return latest(root, stage.name)


@flow(name="homer-pipeline", flow_run_name=run_namer("homer-pipeline", {"profile": "config.profile", "seq_len": "config.prepare.seq_len"}))
def homer_pipeline(config: PipelineConfig = PipelineConfig(), data_dir: str | None = None,
                   stages_on: StagesOn = "here") -> dict[str, StageRef]:
    """Run the whole pipeline: ingest, prepare, pretrain, fine-tune, report.

    Args:
        config: every stage's settings (defaults: the published recipe)
        data_dir: artifact root (default: $HOMER_DATA_DIR or ./data)
        stages_on: here = every stage in this run's process; pools = each stage as a run of its deployment, on its work pool (data: homer-pool, training: homer-gpu); needs a root every worker reaches
    """
    root = data_root(data_dir)
    check_writable(root)
    started = time.time()
    sources = [stage for stage in STAGES.values() if not stage.inputs]
    with ThreadPoolExecutor(max_workers=len(sources)) as pool:  # the ingests at the same time
        if stages_on == "pools":
            running = {s.name: _in_thread(pool, run_on_pool, s, config, root) for s in sources}
        else:
            running = {s.name: _in_thread(pool, s.load_flow(), getattr(config, s.section), root_name(root), "config") for s in sources}
        refs = {name: future.result() for name, future in running.items()}
    unused = {"pretrain"} if config.finetune.init_from else set()  # fine-tuning starts from init_from instead
    for stage in STAGES.values():
        if stage.inputs and stage.name not in unused:
            # An input nothing produced (pretrain, when unused) is None: the stage reads it from its own config
            # (finetune.init_from) or from the output it belongs with (the report reads the finetune manifest).
            inputs = {param: refs.get(upstream) for param, upstream in stage.inputs.items()}
            try:
                if stages_on == "pools":
                    refs[stage.name] = run_on_pool(stage, config, root, inputs)
                else:
                    refs[stage.name] = stage.load_flow()(getattr(config, stage.section), **inputs, data_dir=root_name(root),
                                                         start_from="config")
            except CancelledRun as exc:  # a stage was interrupted on request: so is the pipeline
                return Cancelled(message=str(exc))
    # The pipeline run's own page shows the outcome, not only its subflow runs' pages.
    create_markdown_artifact(key=artifact_key("pipeline", "summary"), markdown=pipeline_summary_markdown(refs, started),
                             description="where each stage's output is, bits per character, samples and loss curves")
    return refs
