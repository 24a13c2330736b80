"""The `ingest-simpsons` stage flow: keep one character's spoken lines from the Simpsons CSV.

    homer stage ingest-simpsons --profile sample
    homer stage ingest-simpsons --set simpsons.source=local --set simpsons.path=simpsons_dataset.csv
"""

from __future__ import annotations

from prefect import flow

from flows.naming import run_namer
from model.data.sources import SimpsonsConfig
from model.store.outputs import StageRef, data_root
from tasks.common import flatten, publish_counts, run_stage_task
from tasks.data import ingest_simpsons_task


@flow(name="ingest-simpsons", flow_run_name=run_namer("ingest-simpsons", {"source": "config.source", "character": "config.character"}))
def ingest_simpsons(config: SimpsonsConfig = SimpsonsConfig(), data_dir: str | None = None) -> StageRef:
    """Filter the dialogue CSV to the configured character's lines, repaired and normalised.

    Args:
        config: where the dialogue CSV comes from and whose lines to keep
        data_dir: artifact root (default: $HOMER_DATA_DIR or ./data)
    """
    ref = run_stage_task(ingest_simpsons_task, "ingest-simpsons", config, None, str(data_root(data_dir)))
    publish_counts("ingest-simpsons", ref, flatten(ref.manifest()["counts"]), "rows read, kept and dropped (with reasons)")
    return ref
