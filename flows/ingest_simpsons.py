"""The `ingest-simpsons` stage flow: the fine-tuning lines, by default one character's spoken lines from the Simpsons CSV.

Any table of text works too: a CSV or Parquet file with other column names, a template over
its columns, or a .txt file or folder of .txt files (one line per row); see SimpsonsConfig.

    homer stage ingest-simpsons --profile sample
    homer stage ingest-simpsons --set simpsons.source=local --set simpsons.path=simpsons_dataset.csv
    homer stage ingest-simpsons --set simpsons.source=local --set simpsons.path=lines.txt
    homer stage ingest-simpsons --set simpsons.source=local --set simpsons.path=events.csv \
        --set simpsons.character_column= --set "simpsons.template={minute}' {event_type}: {text}"
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
    """Read the configured lines (by default the dialogue CSV filtered to one character's), repaired and normalised.

    Args:
        config: where the lines come from, which columns make them and which rows to keep
        data_dir: artifact root (default: $HOMER_DATA_DIR or ./data)
        start_from: latest = the config of this stage's latest output, changing only the fields given; config = as given
    """
    config, origin = stage_config(data_root(data_dir), "ingest-simpsons", config, start_from)
    get_run_logger().info("config: started from %s", origin)
    ref = run_stage_task(ingest_simpsons_task, "ingest-simpsons", config, None, root_name(data_root(data_dir)))
    publish_counts("ingest-simpsons", ref, flatten(ref.manifest()["counts"]), "rows read, kept and dropped (with reasons)")
    return ref
