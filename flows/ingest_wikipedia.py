"""The `ingest-wikipedia` stage flow: stream or read articles into Parquet (id, url, title, text).

    homer stage ingest-wikipedia --profile sample
    homer stage ingest-wikipedia --set wikipedia.source=local --set wikipedia.path=articles.jsonl
    homer stage ingest-wikipedia --set wikipedia.dataset=OWNER/NAME --set wikipedia.config_name= --set wikipedia.text_column=body
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.config import StartFrom, stage_config
from flows.naming import run_namer
from model.data.sources import WikipediaConfig
from model.store.outputs import StageRef, data_root, root_name
from tasks.common import flatten, publish_counts, run_stage_task
from tasks.data import ingest_wikipedia_task


@flow(name="ingest-wikipedia", flow_run_name=run_namer("ingest-wikipedia", {"from": "start_from", "source": "config.source", "max": "config.max_articles"}))
def ingest_wikipedia(config: WikipediaConfig = WikipediaConfig(), data_dir: str | None = None,
        start_from: StartFrom = "latest") -> StageRef:
    """Read Wikipedia articles (hub, local file or the bundled sample) into the artifact store.

    Args:
        config: where the articles come from and how many to take
        data_dir: artifact root (default: $HOMER_DATA_DIR or ./data)
        start_from: latest = the config of this stage's latest output, changing only the fields given; config = as given
    """
    config, origin = stage_config(data_root(data_dir), "ingest-wikipedia", config, start_from)
    get_run_logger().info("config: started from %s", origin)
    ref = run_stage_task(ingest_wikipedia_task, "ingest-wikipedia", config, None, root_name(data_root(data_dir)))
    publish_counts("ingest-wikipedia", ref, flatten(ref.manifest()["counts"]), "articles read, kept and dropped")
    return ref
