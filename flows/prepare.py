"""The `prepare` stage flow: corpora, vocabulary and Parquet sequence shards.

With no inputs given it uses the latest outputs of both ingest stages; an input may
also be a fingerprint or an output directory.

    homer stage prepare --set prepare.seq_len=50
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.config import StartFrom, stage_config
from flows.naming import run_namer
from model.data.prepare import PrepareConfig
from model.store.outputs import StageRef, data_root, root_name, resolve
from tasks.common import flatten, publish_counts, run_stage_task
from tasks.data import prepare_task


@flow(name="prepare", flow_run_name=run_namer("prepare", {"from": "start_from", "seq_len": "config.seq_len", "val": "config.val_fraction"}))
def prepare(
    config: PrepareConfig = PrepareConfig(),
    wikipedia: StageRef | str | None = None,
    simpsons: StageRef | str | None = None,
    data_dir: str | None = None,
    start_from: StartFrom = "latest",
) -> StageRef:
    """Build corpora, the character vocabulary and train/val/test shards from the ingested data.

    Args:
        config: sequence length, validation split, vocabulary and shard settings
        wikipedia: ingest-wikipedia output (fingerprint or directory); empty = the latest
        simpsons: ingest-simpsons output (fingerprint or directory); empty = the latest
        data_dir: artifact root (default: $HOMER_DATA_DIR or ./data)
        start_from: latest = the config of this stage's latest output, changing only the fields given; config = as given
    """
    root = data_root(data_dir)
    config, origin = stage_config(root, "prepare", config, start_from)
    get_run_logger().info("config: started from %s", origin)
    inputs = {"wikipedia": resolve(root, "ingest-wikipedia", wikipedia), "simpsons": resolve(root, "ingest-simpsons", simpsons)}
    ref = run_stage_task(prepare_task, "prepare", config, inputs, root_name(root))
    counts = ref.manifest()["counts"]
    publish_counts("prepare", ref, flatten(counts), "vocabulary size, out-of-vocabulary rates, documents and windows per split")
    return ref
