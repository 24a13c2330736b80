"""The prepare stage's fan-out: one mapped task per corpus part, on threads or a Dask cluster.

Whatever the runner, the number of workers and the part size, the output is byte-identical
to a one-part run and to the single-process functions of model.data.prepare (corpora,
vocab.json, every shard), with equal manifest counts; a part that cannot read its input
fails the run with an error naming the part and the file, and publishes nothing.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from model.data.prepare import (PrepareConfig, PrepareError, Part, corpus_char_counts, group_lines, plan_parts, read_rows,
                                simpsons_documents, wikipedia_documents, write_corpus, write_shards)
from model.data.sources import SimpsonsConfig, WikipediaConfig
from model.data.vocab import build_vocab
from model.store.outputs import StageRef, has_latest, read_manifest, write_manifest

pytestmark = pytest.mark.usefixtures("prefect_harness")

# Small shards and a short sequence: many shards, and shards shared by neighbouring parts.
BASE = dict(seq_len=40, lines_per_doc=10, rows_per_shard=97)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, prefect_harness) -> dict[str, str]:
    """Both sample ingests, once for the module: {"wikipedia": output dir, "simpsons": output dir}."""
    from flows.ingest_simpsons import ingest_simpsons
    from flows.ingest_wikipedia import ingest_wikipedia

    root = str(tmp_path_factory.mktemp("ingests"))
    return {"wikipedia": ingest_wikipedia(WikipediaConfig(source="sample"), data_dir=root, start_from="config").path,
            "simpsons": ingest_simpsons(SimpsonsConfig(source="sample"), data_dir=root, start_from="config").path}


def run_prepare(root: Path, ingested: dict[str, str], return_state: bool = False, **config):
    from flows.prepare import prepare

    return prepare(PrepareConfig(**BASE, **config), ingested["wikipedia"], ingested["simpsons"], data_dir=str(root),
                   start_from="config", return_state=return_state)


def files_of(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def counts_of(out: Path) -> dict:
    counts = dict(read_manifest(out)["counts"])
    counts.pop("seconds")
    return counts


def reference(tmp_path: Path, ingested: dict[str, str]) -> dict[str, bytes]:
    """The output as the single-process functions make it: write_corpus, corpus_char_counts, build_vocab, write_shards."""
    cfg = PrepareConfig(**BASE)
    out = tmp_path / "reference"
    (out / "corpora").mkdir(parents=True)
    articles = pq.read_table(Path(ingested["wikipedia"]) / "articles.parquet", columns=["id", "text"]).to_pylist()
    lines = pq.read_table(Path(ingested["simpsons"]) / "lines.parquet", columns=["text"]).column("text").to_pylist()
    write_corpus(((a["id"], a["text"]) for a in articles), out / "corpora" / "wikipedia.parquet")
    write_corpus(group_lines(iter(lines), cfg.lines_per_doc, "simpsons"), out / "corpora" / "simpsons.parquet")
    counts = corpus_char_counts(out / "corpora" / "wikipedia.parquet") + corpus_char_counts(out / "corpora" / "simpsons.parquet")
    vocab = build_vocab(counts, cfg.min_count)
    vocab.save(out / "vocab.json")
    for name in ("wikipedia", "simpsons"):
        write_shards(out / "corpora" / f"{name}.parquet", vocab, out / "shards" / name, name, cfg)
    return files_of(out)


def test_parts_cover_the_documents_as_one_read_does(ingested):
    articles = Path(ingested["wikipedia"]) / "articles.parquet"
    lines = Path(ingested["simpsons"]) / "lines.parquet"
    whole_w = [d for ids, texts in wikipedia_documents(articles, 0, 10**9) for d in zip(ids, texts)]
    whole_s = list(group_lines(iter(pq.read_table(lines).column("text").to_pylist()), 10, "simpsons"))
    for per in (1, 7, 10**6):
        parts = plan_parts({"wikipedia": len(whole_w), "simpsons": len(whole_s)}, per)
        got_w = [d for p in parts if p.corpus == "wikipedia" for ids, texts in wikipedia_documents(articles, p.start, p.stop) for d in zip(ids, texts)]
        got_s = [d for p in parts if p.corpus == "simpsons" for ids, texts in simpsons_documents(lines, p.start, p.stop, 10) for d in zip(ids, texts)]
        assert got_w == whole_w and got_s == whole_s
    assert plan_parts({"wikipedia": 0}, 5) == [Part(corpus="wikipedia", index=0, start=0, stop=0)]


@pytest.mark.slow
def test_threads_and_many_parts_give_the_bytes_of_one_part(tmp_path, ingested):
    one = run_prepare(tmp_path / "one", ingested, docs_per_part=10**6, max_workers=1)
    many = run_prepare(tmp_path / "many", ingested, docs_per_part=4, max_workers=2)
    odd = run_prepare(tmp_path / "odd", ingested, docs_per_part=13, max_workers=3)
    assert one.fingerprint == many.fingerprint == odd.fingerprint  # where and in how many parts: not in the fingerprint
    expected = files_of(one.dir)
    assert expected == reference(tmp_path, ingested)  # the format is the single-process one, byte for byte
    assert files_of(many.dir) == expected and files_of(odd.dir) == expected
    assert counts_of(many.dir) == counts_of(one.dir) == counts_of(odd.dir)
    assert read_manifest(many.dir)["files"] == read_manifest(one.dir)["files"]
    assert sum(name.startswith("shards/wikipedia/train-") for name in expected) > 5
    leftovers = [p for p in many.dir.rglob("*") if p.name.startswith(".")]
    assert leftovers == [], leftovers  # no pieces or part scratch folders left in the output


@pytest.mark.slow
def test_dask_cluster_gives_the_same_bytes(tmp_path, ingested):
    pytest.importorskip("prefect_dask")
    from distributed import LocalCluster

    one = run_prepare(tmp_path / "one", ingested, docs_per_part=10**6, max_workers=1)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        # Few parts: each Dask task run costs about 0.3 s of Prefect overhead here (2 cores).
        dask = run_prepare(tmp_path / "dask", ingested, docs_per_part=20, task_runner="dask", dask_address=cluster.scheduler_address)
    assert dask.fingerprint == one.fingerprint
    assert files_of(dask.dir) == files_of(one.dir)
    assert counts_of(dask.dir) == counts_of(one.dir)
    assert read_manifest(dask.dir)["config"]["task_runner"] == "dask"


@pytest.mark.slow
def test_each_part_is_a_mapped_task_run(tmp_path, ingested):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterParentFlowRunId, TaskRunFilter,
                                                TaskRunFilterFlowRunId)

    state = run_prepare(tmp_path / "out", ingested, return_state=True, docs_per_part=6, max_workers=2)
    ref = state.result()
    parts = plan_parts({"wikipedia": pq.ParquetFile(Path(ingested["wikipedia"]) / "articles.parquet").metadata.num_rows,
                        "simpsons": -(-pq.ParquetFile(Path(ingested["simpsons"]) / "lines.parquet").metadata.num_rows // 10)}, 6)
    assert len(parts) > 10
    expected = 2 * len(parts) + 5  # count and shards per part; corpus and merge per corpus; the vocabulary
    with get_client(sync_client=True) as client:
        (sub,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
        deadline = time.monotonic() + 30
        while True:  # the server records task runs from their events, a moment after they happen
            runs = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[sub.id])), limit=200)
            if (len(runs) >= expected and all(r.state.is_completed() for r in runs)) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert sub.name.startswith("prepare-parts runner=threads")
    names = sorted(r.name for r in runs)
    assert len(runs) == expected and all(r.state.is_completed() for r in runs), [(r.name, r.state.type) for r in runs]
    assert sorted(n for n in names if n.startswith("count-")) == sorted(f"count-{p.name}" for p in parts)
    assert sorted(n for n in names if n.startswith("shards-")) == sorted(f"shards-{p.name}" for p in parts)
    assert {"corpus-wikipedia", "corpus-simpsons", "merge-wikipedia", "merge-simpsons"} <= set(names)
    assert read_manifest(ref.dir)["counts"]["shards"]["simpsons"]["train"]["windows"] > 0


@pytest.mark.slow
def test_a_damaged_output_is_rebuilt_by_the_parts(tmp_path, ingested):
    first = run_prepare(tmp_path / "out", ingested, docs_per_part=20)
    shard = sorted((first.dir / "shards" / "wikipedia").glob("train-*.parquet"))[1]
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])
    again = run_prepare(tmp_path / "out", ingested, docs_per_part=20)
    assert again == first and shard.read_bytes() == good
    (aside,) = first.dir.parent.glob(f"{first.fingerprint}.damaged-*")
    assert (aside / "shards" / "wikipedia" / shard.name).stat().st_size == len(good) // 2


def corrupt_row_group(ingest_dir: Path, rows_per_group: int, bad_group: int) -> None:
    """Rewrite articles.parquet with small row groups and overwrite one group's text column; keep the manifest true to it."""
    path = ingest_dir / "articles.parquet"
    pq.write_table(pq.read_table(path), path, row_group_size=rows_per_group, compression="zstd")
    column = pq.ParquetFile(path).metadata.row_group(bad_group).column(3)
    assert column.path_in_schema == "text"
    start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    path.write_bytes(bytes(data))
    write_manifest(ingest_dir, read_manifest(ingest_dir))  # sizes and checksums of the new file: it passes verification
    with pytest.raises(OSError):
        list(read_rows(path, ["text"], bad_group * rows_per_group, (bad_group + 1) * rows_per_group))


def test_a_part_that_cannot_read_its_input_fails_the_run_and_publishes_nothing(tmp_path, ingested):
    bad = tmp_path / "ingest-wikipedia"
    shutil.copytree(ingested["wikipedia"], bad)
    corrupt_row_group(bad, rows_per_group=4, bad_group=2)  # documents 8-11: part wikipedia-00002 of 4-document parts
    root = tmp_path / "out"
    with pytest.raises(PrepareError) as err:
        run_prepare(root, {"wikipedia": str(bad), "simpsons": ingested["simpsons"]}, docs_per_part=4, max_workers=2)
    message = str(err.value)
    assert "part wikipedia-00002 (documents 8-11 of the wikipedia corpus)" in message
    assert f"{bad}/articles.parquet" in message and "thrift" in message
    stage = root / "prepare"
    assert not stage.exists() or not [p for p in stage.iterdir() if not p.name.endswith(".lock")], list(stage.iterdir())
    assert not has_latest(root, "prepare")


def test_dask_without_prefect_dask_names_the_extra(monkeypatch):
    import sys

    from flows.prepare import task_runner_for

    monkeypatch.setitem(sys.modules, "prefect_dask", None)  # as if it were not installed
    with pytest.raises(PrepareError, match=r"pip install 'recurrent-homer\[dask\]'"):
        task_runner_for(PrepareConfig(task_runner="dask"))
    from prefect.task_runners import ThreadPoolTaskRunner

    runner = task_runner_for(PrepareConfig(max_workers=3))
    assert isinstance(runner, ThreadPoolTaskRunner) and runner._max_workers == 3


def test_where_settings_stay_out_of_the_fingerprint():
    from tasks.common import stage_fingerprint

    inputs = {"wikipedia": StageRef(stage="ingest-wikipedia", fingerprint="a" * 16, path="/x"),
              "simpsons": StageRef(stage="ingest-simpsons", fingerprint="b" * 16, path="/y")}
    base = stage_fingerprint("prepare", PrepareConfig(**BASE), inputs)
    where = PrepareConfig(**BASE, docs_per_part=3, task_runner="dask", dask_address="tcp://h:8786", max_workers=7)
    assert stage_fingerprint("prepare", where, inputs) == base
    assert stage_fingerprint("prepare", PrepareConfig(**dict(BASE, seq_len=41)), inputs) != base


@pytest.mark.slow
def test_dask_local_cluster_of_processes(tmp_path, ingested):
    """No dask_address: a local Dask cluster of max_workers processes, started for the run and stopped after it."""
    pytest.importorskip("prefect_dask")
    one = run_prepare(tmp_path / "one", ingested, docs_per_part=10**6, max_workers=1)
    dask = run_prepare(tmp_path / "dask", ingested, docs_per_part=30, task_runner="dask", max_workers=2)
    assert files_of(dask.dir) == files_of(one.dir) and counts_of(dask.dir) == counts_of(one.dir)


@pytest.mark.slow
def test_dask_workers_elsewhere_write_their_parts_into_the_bucket(s3_server, tmp_path, monkeypatch, ingested):
    """A Dask scheduler's address and a root in an object store: the parts write into a writer's folder in the bucket
    (never this machine's staging directory), copied back and committed as any output; the folder is removed after."""
    pytest.importorskip("prefect_dask")
    import uuid

    import boto3
    from distributed import LocalCluster

    import tasks.data

    monkeypatch.setenv("HOMER_CACHE_DIR", str(tmp_path / "cache"))
    root = f"s3://{s3_server.bucket}/{uuid.uuid4().hex[:8]}"
    scratch: list[str] = []
    monkeypatch.setattr(tasks.data, "remove_work", scratch.append)  # keep it, to look at it
    one = run_prepare(tmp_path / "one", ingested, docs_per_part=10**6, max_workers=1)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        ref = run_prepare(root, ingested, docs_per_part=20, task_runner="dask", dask_address=cluster.scheduler_address)
    assert ref.path == f"{root}/prepare/{one.fingerprint}"
    assert files_of(ref.dir) == files_of(one.dir) and counts_of(ref.dir) == counts_of(one.dir)

    (work,) = scratch
    prefix = root.split("/", 3)[3] + f"/prepare/{one.fingerprint}/"
    keys = [o["Key"][len(prefix):] for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(
        Bucket=s3_server.bucket, Prefix=prefix) for o in page.get("Contents", [])]
    folder = work.rsplit("/", 1)[1]
    assert folder.startswith("upload-") and folder != ref.manifest()["dir"]
    written = {k[len(folder) + 1:] for k in keys if k.startswith(folder + "/")}
    assert any(k.startswith(".pieces/wikipedia/") for k in written)  # the shards that parts share, as pieces
    assert {k for k in written if not k.startswith(".")} == set(files_of(one.dir))  # every file, written by the tasks
    tasks.data._store(work).fs.rm(tasks.data._store(work).path(), recursive=True)


@pytest.mark.parametrize("tokenizer", [pytest.param("word", marks=pytest.mark.slow), "bpe"])
def test_word_and_bpe_parts_give_the_bytes_of_one_part(tmp_path, ingested, tokenizer):
    """prepare.tokenizer word / bpe through the fan-out: shards shared by parts carry target_chars, byte for byte."""
    from model.data.shards import read_split, read_target_chars
    from model.data.vocab import Vocab

    one = run_prepare(tmp_path / "one", ingested, docs_per_part=10**6, max_workers=1, tokenizer=tokenizer, vocab_size=400)
    many = run_prepare(tmp_path / "many", ingested, docs_per_part=20, max_workers=2, tokenizer=tokenizer, vocab_size=400)
    assert files_of(many.dir) == files_of(one.dir) and counts_of(many.dir) == counts_of(one.dir)
    vocab = Vocab.load(one.dir / "vocab.json")
    assert vocab.kind == tokenizer and (one.dir / "tokenizer.json").is_file() == (tokenizer == "bpe")
    assert vocab.size <= 400 if tokenizer == "bpe" else vocab.size > 100
    counts = read_manifest(one.dir)["counts"]
    assert counts["tokenizer"] == tokenizer and counts["vocab_fingerprint"] == vocab.fingerprint
    for corpus in ("wikipedia", "simpsons"):
        shards = one.dir / "shards" / corpus
        stats = counts["shards"][corpus]["train"]
        assert read_target_chars(shards, "train").sum() == stats["scored_chars"] > stats["scored_tokens"] > 0
        windows, meta = read_split(shards, "train")
        assert meta["vocab_fingerprint"] == vocab.fingerprint and windows.shape[1] == BASE["seq_len"] + 1
