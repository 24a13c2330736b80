"""The `ingest-simpsons` stage flow: keep one character's spoken lines from the Simpsons CSV.

    homer stage ingest-simpsons --profile sample
    homer stage ingest-simpsons --set simpsons.source=local --set simpsons.path=simpsons_dataset.csv
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.config import StartFrom, stage_config
from flows.naming import run_namer
from model.data.sources import SimpsonsConfig
from model.store.outputs import StageRef, data_root, root_name
from tasks.common import flatten, publish_counts, run_stage_task
from tasks.data import ingest_simpsons_task


@flow(name="ingest-simpsons", flow_run_name=run_namer("ingest-simpsons", {"from": "start_from", "source": "config.source", "character": "config.character"}))
def ingest_simpsons(config: SimpsonsConfig = SimpsonsConfig(), data_dir: str | None = None,
        start_from: StartFrom = "latest") -> StageRef:
    """Filter the dialogue CSV to the configured character's lines, repaired and normalised.

    Args:
        config: where the dialogue CSV comes from and whose lines to keep
        data_dir: artifact root (default: $HOMER_DATA_DIR or ./data)
        start_from: latest = the config of this stage's latest output, changing only the fields given; config = as given
    """
    config, origin = stage_config(data_root(data_dir), "ingest-simpsons", config, start_from)
    get_run_logger().info("config: started from %s", origin)
    ref = run_stage_task(ingest_simpsons_task, "ingest-simpsons", config, None, root_name(data_root(data_dir)))
    publish_counts("ingest-simpsons", ref, flatten(ref.manifest()["counts"]), "rows read, kept and dropped (with reasons)")
    return ref
