"""The `finetune` stage flow: continue from pretrained weights on the character's lines.

Starts from the latest pretrain's `best/` (or `finetune.init_from`: a pretrain
fingerprint, a pretrain output directory or any checkpoint directory) with a fresh
optimizer and the fine-tuning schedule (1e-5 for 4 epochs, then decay).

    homer stage finetune --profile sample
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.config import FinetuneConfig, StartFrom, stage_config
from flows.naming import run_namer
from model.network.checkpoint import resolve_model
from model.store.outputs import StageRef, data_root, root_name, resolve
from tasks.train import finetune_task, run_training


@flow(name="finetune", flow_run_name=run_namer("finetune", {"from": "start_from", "lr": "config.train.learning_rate", "epochs": "config.train.epochs",
                                                            "from": "config.init_from"}))
def finetune(config: FinetuneConfig = FinetuneConfig(), prepare: StageRef | str | None = None,
             pretrain: StageRef | str | None = None, data_dir: str | None = None,
        start_from: StartFrom = "latest") -> StageRef:
    """Fine-tune a pretrained checkpoint on the character's lines at a low learning rate.

    Args:
        config: the starting checkpoint and the training loop (fresh optimizer)
        prepare: prepare output (fingerprint or directory); empty = the one the starting model was
            pretrained on (its manifest), else the latest
        pretrain: pretrain output (fingerprint or directory); empty = config.init_from, else the latest
        data_dir: artifact root (default: $HOMER_DATA_DIR or ./data)
        start_from: latest = the config of this stage's latest output, changing only the fields given; config = as given
    """
    root = data_root(data_dir)
    config, origin = stage_config(root, "finetune", config, start_from)
    get_run_logger().info("config: started from %s", origin)
    if isinstance(pretrain, StageRef):
        start = pretrain
    elif pretrain:
        start = resolve_model(root, pretrain, stages=("pretrain",), label="pretrain")
    else:
        start = resolve_model(root, config.init_from, stages=("pretrain",), label="finetune.init_from")
    if prepare in (None, "") and start.stage == "pretrain":
        prepare = start.manifest()["inputs"]["prepare"]["fingerprint"]  # the data the model was pretrained on
    inputs = {"prepare": resolve(root, "prepare", prepare), "init": start}
    return run_training(finetune_task, "finetune", config, inputs, root_name(root))
