"""`homer_pipeline`: every stage in order, the two ingests at the same time.

    ingest_wikipedia ──┐
                       ├─> prepare ─> pretrain ─> finetune ─> report
    ingest_simpsons ───┘

Each stage reuses a complete output with the same fingerprint, so a second run with
the same config recomputes nothing and a changed parameter recomputes only its stage
and those after it.

    homer run --profile sample
"""

from __future__ import annotations

import contextvars
import time
from concurrent.futures import ThreadPoolExecutor

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import CancelledRun
from prefect.states import Cancelled

from flows.config import PipelineConfig
from flows.naming import run_namer
from model.store.outputs import StageRef, check_writable, data_root, root_name
from tasks.artifacts import pipeline_summary_markdown
from tasks.common import artifact_key
from tasks.stages import STAGES


def _in_thread(pool: ThreadPoolExecutor, fn, *args):
    # Each thread runs in a copy of this flow's context, so its flow is a child of this run.
    return pool.submit(contextvars.copy_context().run, fn, *args)


@flow(name="homer-pipeline", flow_run_name=run_namer("homer-pipeline", {"profile": "config.profile", "seq_len": "config.prepare.seq_len"}))
def homer_pipeline(config: PipelineConfig = PipelineConfig(), data_dir: str | None = None) -> dict[str, StageRef]:
    """Run the whole pipeline: ingest, prepare, pretrain, fine-tune, report.

    Args:
        config: every stage's settings (defaults: the published recipe)
        data_dir: artifact root (default: $HOMER_DATA_DIR or ./data)
    """
    root = data_root(data_dir)
    check_writable(root)
    started = time.time()
    sources = [stage for stage in STAGES.values() if not stage.inputs]
    with ThreadPoolExecutor(max_workers=len(sources)) as pool:  # the ingests at the same time
        running = {s.name: _in_thread(pool, s.load_flow(), getattr(config, s.section), root_name(root), "config") for s in sources}
        refs = {name: future.result() for name, future in running.items()}
    unused = {"pretrain"} if config.finetune.init_from else set()  # fine-tuning starts from init_from instead
    for stage in STAGES.values():
        if stage.inputs and stage.name not in unused:
            # An input nothing produced (pretrain, when unused) is None: the stage reads it from its own config
            # (finetune.init_from) or from the output it belongs with (the report reads the finetune manifest).
            inputs = {param: refs.get(upstream) for param, upstream in stage.inputs.items()}
            try:
                refs[stage.name] = stage.load_flow()(getattr(config, stage.section), **inputs, data_dir=root_name(root),
                                                     start_from="config")
            except CancelledRun as exc:  # a stage was interrupted on request: so is the pipeline
                return Cancelled(message=str(exc))
    # The pipeline run's own page shows the outcome, not only its subflow runs' pages.
    create_markdown_artifact(key=artifact_key("pipeline", "summary"), markdown=pipeline_summary_markdown(refs, started),
                             description="where each stage's output is, bits per character, samples and loss curves")
    return refs
