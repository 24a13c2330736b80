"""The stage registry: every stage of the pipeline, declared once.

`homer stage`, `homer serve`, `homer_pipeline`, the fingerprints (code versions), the
deployments tests (prefect.yaml, deploy/prefect-docker.yaml) and the README's deployments
table all read `STAGES`. Adding a stage
is one entry here plus its flow module. A flow is named by its entrypoint and imported
on use, so this module imports nothing from flows/ (imports point flows -> tasks -> model).

    from tasks.stages import STAGES
    STAGES["prepare"].inputs     # {"wikipedia": "ingest-wikipedia", "simpsons": "ingest-simpsons"}
    STAGES["prepare"].pool       # "homer-pool": its deployment's work pool (training: "homer-gpu")
    STAGES["prepare"].load_flow()(config.prepare, data_dir=root)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

# The two work pools of prefect.yaml: data stages, the report, generate and the whole-pipeline
# deployments run on CPU workers; the training stages on GPU workers. Both are `process` pools by
# default; deploy/prefect-docker.yaml has their `docker` twins (these names + "-docker").
DATA_POOL = "homer-pool"
GPU_POOL = "homer-gpu"


@dataclass(frozen=True)
class Stage:
    name: str  # CLI argument, flow and deployment name, and its folder under the artifact root
    section: str  # the PipelineConfig field holding its config (the flow's `config` parameter)
    entrypoint: str  # "module.function" of its flow
    code_version: str  # part of every fingerprint: bump it when the output's format or logic changes
    summary: str  # one line for the CLI help and the README's deployments table
    inputs: dict[str, str] = field(default_factory=dict)  # flow parameter -> the upstream stage whose output it takes
    trains: bool = False  # a training stage: tagged `gpu`, holds the `gpu` slot on CUDA, deployed on the GPU pool

    @property
    def tags(self) -> list[str]:
        return ["homer", "stage", "gpu"] if self.trains else ["homer", "stage"]

    @property
    def pool(self) -> str:
        """The work pool its deployment runs on (prefect.yaml; a test keeps the two equal)."""
        return GPU_POOL if self.trains else DATA_POOL

    def load_flow(self) -> Callable:
        module, _, function = self.entrypoint.rpartition(".")
        return getattr(importlib.import_module(module), function)


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("ingest-wikipedia", "wikipedia", "flows.ingest_wikipedia.ingest_wikipedia", "2",  # 2: local files read here (any encoding, compression); bad-row and control-character counts
          "articles from the Hugging Face hub, a local file or folder, or the bundled sample"),
    Stage("ingest-simpsons", "simpsons", "flows.ingest_simpsons.ingest_simpsons", "3",  # 2: strict CSV; bad-row and control-character counts; 3: any table or .txt (a .txt path is now lines, not CSV)
          "the fine-tuning lines: the character's from the Kaggle data set, any local CSV, Parquet or .txt, or the bundled sample"),
    Stage("prepare", "prepare", "flows.prepare.prepare", "2",  # 2: a test split; shards carry `overlap`
          "corpora, vocabulary, train/val/test shards",
          inputs={"wikipedia": "ingest-wikipedia", "simpsons": "ingest-simpsons"}),
    Stage("pretrain", "pretrain", "flows.pretrain.pretrain", "2",  # 2: validation scores each character once
          "pretraining on the articles", inputs={"prepare": "prepare"}, trains=True),
    Stage("finetune", "finetune", "flows.finetune.finetune", "2",
          "fine-tuning on the character's lines at a low learning rate",
          inputs={"prepare": "prepare", "pretrain": "pretrain"}, trains=True),
    Stage("report", "report", "flows.report.report", "2",  # 2: test and val figures, inputs from the finetune manifest
          "bits per character on test and validation, samples, loss curves",
          inputs={"prepare": "prepare", "pretrain": "pretrain", "finetune": "finetune"}),
)}


def upstream(stage: str) -> list[str]:
    """The stages whose outputs `stage` takes, in parameter order."""
    return list(STAGES[stage].inputs.values())


def deployments_table() -> str:
    """The README's table of stage deployments (`homer stages` prints it; a test keeps the README equal to it)."""
    rows = ["| deployment | what it runs | parameters | work pool |", "| --- | --- | --- | --- |"]
    for stage in STAGES.values():
        params = ", ".join(f"`{p}`" for p in ("config", *stage.inputs))
        gpu = "; tagged `gpu`, holds the `gpu` slot" if stage.trains else ""
        rows.append(f"| `{stage.name}/{stage.name}` | {stage.summary}{gpu} | {params} | `{stage.pool}` |")
    return "\n".join(rows)
