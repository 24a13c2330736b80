"""The `finetune` stage flow: continue from pretrained weights on the character's lines.

Starts from the latest pretrain's `best/` (or `finetune.init_from`: a pretrain
fingerprint, a pretrain output directory or any checkpoint directory) with a fresh
optimizer and the fine-tuning schedule (1e-5 for 4 epochs, then decay).

    homer stage finetune --profile sample
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from prefect import flow

from flows.config import FinetuneConfig
from flows.naming import run_namer
from model.checkpoint import resolve_checkpoint
from model.store import StageRef, StoreError, data_root, resolve
from tasks.common import run_stage_task
from tasks.train import finetune_task


def resolve_start(root: Path, init_from: str | None, label: str = "finetune.init_from") -> StageRef:
    """A pretrain output (by fingerprint, path or latest), or a bare checkpoint directory."""
    if init_from and resolve_checkpoint(Path(init_from)) is not None:
        path = Path(init_from).absolute()
        digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()[:16]
        return StageRef(stage="checkpoint", fingerprint=digest, path=str(path))
    try:
        return resolve(root, "pretrain", init_from)
    except StoreError as exc:
        raise StoreError(f"{label}: {exc}") from None


@flow(name="finetune", flow_run_name=run_namer("finetune", {"lr": "config.train.learning_rate", "epochs": "config.train.epochs",
                                                            "from": "config.init_from"}))
def finetune(config: FinetuneConfig = FinetuneConfig(), prepare: StageRef | str | None = None,
             pretrain: StageRef | str | None = None, data_dir: str | None = None) -> StageRef:
    """Fine-tune a pretrained checkpoint on the character's lines at a low learning rate.

    Args:
        config: the starting checkpoint and the training loop (fresh optimizer)
        prepare: prepare output (fingerprint or directory); empty = the one the starting model was
            pretrained on (its manifest), else the latest
        pretrain: pretrain output (fingerprint or directory); empty = config.init_from, else the latest
        data_dir: artifact root (default: $HOMER_DATA_DIR or ./data)
    """
    root = data_root(data_dir)
    if isinstance(pretrain, StageRef):
        start = pretrain
    elif pretrain:
        start = resolve_start(root, pretrain, label="pretrain")
    else:
        start = resolve_start(root, config.init_from)
    if prepare in (None, "") and start.stage == "pretrain":
        prepare = start.manifest()["inputs"]["prepare"]["fingerprint"]  # the data the model was pretrained on
    inputs = {"prepare": resolve(root, "prepare", prepare), "init": start}
    return run_stage_task(finetune_task, "finetune", config, inputs, str(root))
