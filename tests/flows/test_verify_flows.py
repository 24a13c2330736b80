"""A damaged output under Prefect: re-running its stage rebuilds it (never a Cached stale copy), and a
stage refuses damaged inputs, naming the file and the stage that remakes it."""

from __future__ import annotations

import pytest
from prefect import flow

from model.data.prepare import PrepareConfig
from model.data.sources import SimpsonsConfig, WikipediaConfig
from model.store.outputs import StoreError, is_complete, read_manifest, resolve
from tasks.common import run_stage_task
from tasks.data import ingest_simpsons_task, ingest_wikipedia_task, prepare_task

pytestmark = pytest.mark.usefixtures("prefect_harness")


@flow
def _stage(name: str, config, root: str):
    """One stage through run_stage_task, its inputs the latest of the stages before it (resolved, so size-checked)."""
    task = {"ingest-wikipedia": ingest_wikipedia_task, "ingest-simpsons": ingest_simpsons_task, "prepare": prepare_task}[name]
    inputs = ({"wikipedia": resolve(root, "ingest-wikipedia", None), "simpsons": resolve(root, "ingest-simpsons", None)}
              if name == "prepare" else None)
    return run_stage_task(task, name, config, inputs, root, return_state=True)


def test_damaged_outputs_are_rebuilt_and_never_read(data_dir):
    root = str(data_dir)
    _stage("ingest-wikipedia", WikipediaConfig(source="sample"), root)
    simpsons = _stage("ingest-simpsons", SimpsonsConfig(source="sample"), root).result()
    cfg = PrepareConfig(seq_len=40, lines_per_doc=10)
    first = _stage("prepare", cfg, root)
    ref = first.result()
    assert first.name != "Cached" and _stage("prepare", cfg, root).name == "Cached"
    shard = sorted((ref.dir / "shards" / "simpsons").glob("train-*.parquet"))[0]
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])  # a truncated shard

    again = _stage("prepare", cfg, root)
    assert again.name != "Cached" and again.result() == ref  # rebuilt in place, not served from the cache
    assert shard.stat().st_size == size and is_complete(ref.dir)
    (aside,) = ref.dir.parent.glob(f"{ref.fingerprint}.damaged-*")
    assert (aside / "shards" / "simpsons" / shard.name).stat().st_size == size // 2

    (simpsons.dir / "lines.parquet").unlink()  # a deleted input: an error naming it and its stage
    with pytest.raises(StoreError, match=r"lines.parquet is missing .*the ingest-simpsons output .*homer stage ingest-simpsons"):
        _stage("prepare", PrepareConfig(seq_len=30, lines_per_doc=10), root)
    assert _stage("ingest-simpsons", SimpsonsConfig(source="sample"), root).name != "Cached"
    assert (simpsons.dir / "lines.parquet").is_file() and is_complete(simpsons.dir)

    articles = data_dir / "ingest-wikipedia" / read_manifest(ref.dir)["inputs"]["wikipedia"]["fingerprint"] / "articles.parquet"
    data = bytearray(articles.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content: the checksum of an input, checked before a stage reads it
    articles.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"articles.parquet does not match its checksum.*homer stage ingest-wikipedia"):
        _stage("prepare", PrepareConfig(seq_len=30, lines_per_doc=10), root)
