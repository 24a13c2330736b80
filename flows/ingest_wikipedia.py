"""The `ingest-wikipedia` stage flow: stream or read articles into Parquet (id, url, title, text).

    homer stage ingest-wikipedia --profile sample
    homer stage ingest-wikipedia --set wikipedia.source=local --set wikipedia.path=articles.jsonl
"""

from __future__ import annotations

from prefect import flow

from flows.naming import run_namer
from model.data.sources import WikipediaConfig
from model.store.outputs import StageRef, data_root
from tasks.common import flatten, publish_counts, run_stage_task
from tasks.data import ingest_wikipedia_task


@flow(name="ingest-wikipedia", flow_run_name=run_namer("ingest-wikipedia", {"source": "config.source", "max": "config.max_articles"}))
def ingest_wikipedia(config: WikipediaConfig = WikipediaConfig(), data_dir: str | None = None) -> StageRef:
    """Read Wikipedia articles (hub, local file or the bundled sample) into the artifact store.

    Args:
        config: where the articles come from and how many to take
        data_dir: artifact root (default: $HOMER_DATA_DIR or ./data)
    """
    ref = run_stage_task(ingest_wikipedia_task, "ingest-wikipedia", config, None, str(data_root(data_dir)))
    publish_counts("ingest-wikipedia", ref, flatten(ref.manifest()["counts"]), "articles read, kept and dropped")
    return ref
