"""The `pretrain` stage flow: train the network on the Wikipedia shards.

With no input it trains on the latest `prepare` output. Interrupted, it resumes from
`last/` when run again with the same config; finished, it is reused.

    homer stage pretrain --profile sample
    homer stage pretrain --set pretrain.train.epochs=20 --input prepare=<fingerprint>
"""

from __future__ import annotations

from prefect import flow

from flows.config import PretrainConfig
from flows.naming import run_namer
from model.store.outputs import StageRef, data_root, resolve
from tasks.common import run_stage_task
from tasks.train import pretrain_task


@flow(name="pretrain", flow_run_name=run_namer("pretrain", {"cell": "config.model.cell", "hidden": "config.model.hidden_sizes",
                                                            "lr": "config.train.learning_rate", "epochs": "config.train.epochs"}))
def pretrain(config: PretrainConfig = PretrainConfig(), prepare: StageRef | str | None = None, data_dir: str | None = None) -> StageRef:
    """Pretrain the character model on the articles' shards (published recipe by default).

    Args:
        config: the network and the training loop
        prepare: prepare output (fingerprint or directory); empty = the latest
        data_dir: artifact root (default: $HOMER_DATA_DIR or ./data)
    """
    root = data_root(data_dir)
    inputs = {"prepare": resolve(root, "prepare", prepare)}
    return run_stage_task(pretrain_task, "pretrain", config, inputs, str(root))
