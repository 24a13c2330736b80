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
from concurrent.futures import ThreadPoolExecutor

from prefect import flow

from flows.config import PipelineConfig
from flows.ingest_simpsons import ingest_simpsons
from flows.ingest_wikipedia import ingest_wikipedia
from flows.naming import run_namer
from flows.finetune import finetune
from flows.prepare import prepare
from flows.pretrain import pretrain
from flows.report import report
from model.store import StageRef, check_writable, data_root


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
    with ThreadPoolExecutor(max_workers=2) as pool:
        wikipedia = _in_thread(pool, ingest_wikipedia, config.wikipedia, str(root))
        simpsons = _in_thread(pool, ingest_simpsons, config.simpsons, str(root))
        refs = {"ingest-wikipedia": wikipedia.result(), "ingest-simpsons": simpsons.result()}
    refs["prepare"] = prepare(config.prepare, refs["ingest-wikipedia"], refs["ingest-simpsons"], str(root))
    if not config.finetune.init_from:  # with init_from set, no pretraining would be used: none runs
        refs["pretrain"] = pretrain(config.pretrain, refs["prepare"], str(root))
    refs["finetune"] = finetune(config.finetune, refs["prepare"], refs.get("pretrain"), str(root))  # None: init_from
    # The report reads the model fine-tuning started from out of the finetune output's manifest.
    refs["report"] = report(config.report, refs["prepare"], refs.get("pretrain"), refs["finetune"], str(root))
    return refs
