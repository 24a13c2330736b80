"""The `pretrain` stage flow: train the network on the Wikipedia shards.

With no input it trains on the latest `prepare` output. Interrupted, it resumes from
`last/` when run again with the same config; finished, it is reused.

    homer stage pretrain --profile sample
    homer stage pretrain --set pretrain.train.epochs=20 --input prepare=<fingerprint>
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.config import PretrainConfig, StartFrom, stage_config
from flows.naming import run_namer
from model.store.outputs import StageRef, data_root, root_name, resolve
from tasks.train import pretrain_task, run_training


@flow(name="pretrain", flow_run_name=run_namer("pretrain", {"from": "start_from", "cell": "config.model.cell", "hidden": "config.model.hidden_sizes",
                                                            "lr": "config.train.learning_rate", "epochs": "config.train.epochs"}))
def pretrain(config: PretrainConfig = PretrainConfig(), prepare: StageRef | str | None = None, data_dir: str | None = None,
        start_from: StartFrom = "latest") -> StageRef:
    """Pretrain the character model on the articles' shards (published recipe by default).

    Args:
        config: the network and the training loop
        prepare: prepare output (fingerprint or directory); empty = the latest
        data_dir: artifact root (default: $HOMER_DATA_DIR or ./data)
        start_from: latest = the config of this stage's latest output, changing only the fields given; config = as given
    """
    root = data_root(data_dir)
    config, origin = stage_config(root, "pretrain", config, start_from)
    get_run_logger().info("config: started from %s", origin)
    inputs = {"prepare": resolve(root, "prepare", prepare)}
    return run_training(pretrain_task, "pretrain", config, inputs, root_name(root))
