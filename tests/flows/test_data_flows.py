"""The data stages as Prefect flows: real hub and Kaggle loading code on local data, caching,
re-runs, concurrent runs and bad input."""

from __future__ import annotations

import shutil
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prefect import flow

from model.data.prepare import PrepareConfig
from model.data.sources import SimpsonsConfig, SourceError, WikipediaConfig, read_wikipedia
from model.store.outputs import StoreError, latest, read_manifest
from tasks.common import run_stage_task
from tests.helpers import run_twice_at_once
from tasks.data import ingest_simpsons_task

pytestmark = pytest.mark.usefixtures("prefect_harness")

HANDLE = "pierremegret/dialogue-lines-of-the-simpsons"


def hub_folder(tmp_path, n=12):
    """A folder laid out like wikimedia/wikipedia on the hub: config dirs of Parquet shards + README configs."""
    root = tmp_path / "hub" / "wikipedia"
    (root / "20231101.en").mkdir(parents=True)
    rows = [{"id": str(1000 + i), "url": f"https://en.wikipedia.org/wiki/A{i}", "title": f"A{i}",
             "text": f"Article {i}. " + "Springfield has a nuclear plant. " * (5 + i)} for i in range(n)]
    half = n // 2
    pq.write_table(pa.Table.from_pylist(rows[:half]), root / "20231101.en" / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[half:]), root / "20231101.en" / "train-00001-of-00002.parquet")
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: 20231101.en\n  data_files:\n  - split: train\n    path: 20231101.en/train-*\n---\n"
    )
    return root, rows


def kaggle_cache(tmp_path, monkeypatch, csv_text, version=3):
    """A pre-filled KAGGLEHUB_CACHE holding a versioned download of the data set."""
    cache = tmp_path / "kagglehub"
    folder = cache / "datasets" / HANDLE / "versions" / str(version)
    folder.mkdir(parents=True)
    (folder / "simpsons_dataset.csv").write_text(csv_text, encoding="utf-8")
    (cache / "datasets" / HANDLE / f"{version}.complete").write_text("")
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(cache))
    return f"{HANDLE}/versions/{version}"


def test_hub_source_streams_through_datasets(tmp_path, data_dir):
    from flows.ingest_wikipedia import ingest_wikipedia

    folder, rows = hub_folder(tmp_path)
    ref = ingest_wikipedia(WikipediaConfig(source="hub", dataset=str(folder), max_articles=9))
    table = pq.read_table(ref.dir / "articles.parquet")
    assert table.column_names == ["id", "url", "title", "text"]
    assert table.column("id").to_pylist() == [r["id"] for r in rows[:9]]
    assert table.column("text").to_pylist() == [r["text"] for r in rows[:9]]
    assert read_manifest(ref.dir)["counts"]["articles"] == 9 and latest(data_dir, "ingest-wikipedia") == ref


def test_hub_shuffle_buffer_is_seeded(tmp_path):
    folder, rows = hub_folder(tmp_path, n=20)
    take = lambda seed: [a["id"] for a in read_wikipedia(WikipediaConfig(source="hub", dataset=str(folder), max_articles=10, shuffle_buffer=20, seed=seed))]
    assert take(1) == take(1) and take(1) != take(2) and take(1) != [r["id"] for r in rows[:10]]


def test_unreachable_hub_fails_fast_and_names_the_offline_sources(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    started = time.monotonic()
    with pytest.raises(SourceError) as err:
        list(read_wikipedia(WikipediaConfig(source="hub", retries=1, backoff_s=0.2)))
    assert time.monotonic() - started < 10
    assert "wikipedia.source=local" in str(err.value) and "wikipedia.source=sample" in str(err.value)


def test_kaggle_source_reads_the_kagglehub_cache(tmp_path, monkeypatch, data_dir, small_csv):
    from flows.ingest_simpsons import ingest_simpsons

    handle = kaggle_cache(tmp_path, monkeypatch, small_csv.read_text(encoding="utf-8"))
    ref = ingest_simpsons(SimpsonsConfig(source="kaggle", handle=handle))
    lines = pq.read_table(ref.dir / "lines.parquet").to_pylist()
    assert [x["row"] for x in lines] == [2, 6, 8]
    manifest = read_manifest(ref.dir)
    assert manifest["counts"]["kept"] == 3 and manifest["counts"]["dropped_blank"] == 1
    assert manifest["source_file"].startswith(str(tmp_path / "kagglehub"))


def test_second_run_is_cached_and_leaves_the_output_untouched(tmp_path, data_dir, small_csv):
    @flow
    def twice(config: SimpsonsConfig):
        first = run_stage_task(ingest_simpsons_task, "ingest-simpsons", config, None, str(data_dir), return_state=True)
        second = run_stage_task(ingest_simpsons_task, "ingest-simpsons", config, None, str(data_dir), return_state=True)
        return first, second

    cfg = SimpsonsConfig(source="local", path=str(small_csv))
    first, second = twice(cfg)
    assert first.is_completed() and not first.name == "Cached" and second.name == "Cached"
    ref = first.result()
    assert second.result() == ref
    before = (ref.dir / "lines.parquet").stat().st_mtime_ns
    shutil.rmtree(ref.dir)  # a deleted output is rebuilt, never served from a stale cache
    again, _ = twice(cfg)
    assert again.name != "Cached" and (ref.dir / "lines.parquet").is_file()
    assert (ref.dir / "lines.parquet").stat().st_mtime_ns != before


def _prepare_inputs(tmp_path, data_dir, small_csv):
    from flows.ingest_simpsons import ingest_simpsons
    from flows.ingest_wikipedia import ingest_wikipedia

    folder, _ = hub_folder(tmp_path, n=30)
    big_csv = small_csv.read_text() + "".join(f"Homer Simpson,Line number {i} about beer and doughnuts.\n" for i in range(300))
    small_csv.write_text(big_csv)
    return (ingest_wikipedia(WikipediaConfig(source="hub", dataset=str(folder), max_articles=30)),
            ingest_simpsons(SimpsonsConfig(source="local", path=str(small_csv))))


def test_prepare_recomputes_only_when_its_config_changes(tmp_path, data_dir, small_csv):
    from flows.prepare import prepare

    wiki, simp = _prepare_inputs(tmp_path, data_dir, small_csv)
    first = prepare(PrepareConfig(seq_len=40, lines_per_doc=8))  # no inputs given: the latest of each ingest
    assert read_manifest(first.dir)["inputs"]["wikipedia"]["fingerprint"] == wiki.fingerprint
    same = prepare(PrepareConfig(seq_len=40, lines_per_doc=8), wiki.fingerprint, simp.path)
    assert same == first
    other = prepare(PrepareConfig(seq_len=30, lines_per_doc=8))
    assert other.fingerprint != first.fingerprint and latest(data_dir, "prepare") == other
    assert first.dir.is_dir() and other.dir.is_dir()


def test_two_runs_at_once_leave_one_intact_output(tmp_path, data_dir, small_csv):
    from flows.prepare import prepare
    from model.data.shards import read_split

    _prepare_inputs(tmp_path, data_dir, small_csv)
    results = run_twice_at_once(lambda: prepare(PrepareConfig(seq_len=20, lines_per_doc=8)))
    assert results[0] == results[1]
    stage_dir = data_dir / "prepare"
    assert sorted(p.name for p in stage_dir.iterdir() if not p.name.endswith(".lock")) == sorted([results[0].fingerprint, "latest"])
    windows, meta = read_split(results[0].dir / "shards" / "simpsons", "train")
    assert len(windows) == meta["rows"] > 0


def test_bad_inputs_fail_clearly_and_publish_nothing(tmp_path, data_dir, small_csv):
    from flows.ingest_simpsons import ingest_simpsons
    from flows.prepare import prepare

    with pytest.raises(SourceError, match="Ned Flanders"):
        ingest_simpsons(SimpsonsConfig(source="local", path=str(small_csv), character="Ned Flanders"))
    assert not (data_dir / "ingest-simpsons").exists() or not any((data_dir / "ingest-simpsons").iterdir())
    with pytest.raises(StoreError, match="homer stage ingest-wikipedia"):
        prepare(PrepareConfig())
    _prepare_inputs(tmp_path, data_dir, small_csv)
    with pytest.raises(Exception, match="prepare.seq_len=5000"):
        prepare(PrepareConfig(seq_len=5000))
    assert not (data_dir / "prepare").exists() or not [p for p in (data_dir / "prepare").iterdir() if not p.name.startswith(".")]


def test_unwritable_root_is_named(tmp_path, monkeypatch, small_csv):
    from flows.ingest_simpsons import ingest_simpsons

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("HOMER_DATA_DIR", str(blocker / "data"))
    with pytest.raises(StoreError, match="HOMER_DATA_DIR"):
        ingest_simpsons(SimpsonsConfig(source="local", path=str(small_csv)))


def test_cli_stage_ingest_simpsons_and_prepare_print_a_summary(data_dir, small_csv):
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["stage", "ingest-simpsons", "--set", "simpsons.source=local", "--set", f"simpsons.path={small_csv}"])
    assert result.exit_code == 0, result.output
    ref = latest(data_dir, "ingest-simpsons")
    assert ref.path in result.output and "kept: 3" in result.output and "dropped_no_words: 1" in result.output
    assert [x["text"] for x in pq.read_table(ref.dir / "lines.parquet").to_pylist()][0].startswith("Marge, I said")

    bad = runner.invoke(app, ["stage", "prepare", "--set", "prepare.seq_len=0", "--set", "prepare.val_fraction=2"])
    assert bad.exit_code == 2 and "prepare.seq_len" in bad.output and "prepare.val_fraction" in bad.output
    missing = runner.invoke(app, ["stage", "prepare"])
    assert missing.exit_code == 1 and "ingest-wikipedia" in missing.output
    unknown = runner.invoke(app, ["stage", "train-everything"])
    assert unknown.exit_code == 2 and "unknown stage" in unknown.output


def test_latest_follows_the_last_run_even_when_it_is_cached(data_dir, small_csv):
    from flows.ingest_simpsons import ingest_simpsons

    # the character is given explicitly: a stage run starts from its latest output's config and changes only the fields given
    homer = SimpsonsConfig(source="local", path=str(small_csv), character="Homer Simpson")
    marge = SimpsonsConfig(source="local", path=str(small_csv), character="Marge Simpson")
    a = ingest_simpsons(homer)
    b = ingest_simpsons(marge)
    assert latest(data_dir, "ingest-simpsons") == b
    assert ingest_simpsons(homer) == a  # served from the cache
    assert latest(data_dir, "ingest-simpsons") == a


def test_an_edited_source_file_is_ingested_again(data_dir, small_csv):
    from flows.ingest_simpsons import ingest_simpsons

    cfg = SimpsonsConfig(source="local", path=str(small_csv))
    first = ingest_simpsons(cfg)
    small_csv.write_text(small_csv.read_text() + "Homer Simpson,One more doughnut.\n", encoding="utf-8")
    second = ingest_simpsons(cfg)
    assert second.fingerprint != first.fingerprint
    assert read_manifest(second.dir)["counts"]["kept"] == read_manifest(first.dir)["counts"]["kept"] + 1


def test_cli_rejects_inputs_the_stage_does_not_take(data_dir):
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["stage", "pretrain", "--input", "prepare", "--input", "ingest_wikipedia=abc"])
    assert result.exit_code == 2
    assert "expected STAGE=FINGERPRINT|PATH" in result.output and "pretrain takes prepare" in result.output


def test_ingests_count_skipped_rows_and_dropped_control_characters(tmp_path, data_dir):
    """A gzip'd UTF-16 CSV and a JSON Lines file, each with a bad row and a NUL: skip and drop, counted in the manifests."""
    import gzip
    import json

    from flows.ingest_simpsons import ingest_simpsons
    from flows.ingest_wikipedia import ingest_wikipedia

    csv_path = tmp_path / "simpsons_dataset.csv"
    rows = "raw_character_text,spoken_words\nHomer Simpson,D'oh!\x00\nHomer Simpson,a,b\nHomer Simpson,Woo-hoo!\n"
    csv_path.write_bytes(gzip.compress(rows.encode("utf-16")))
    ref = ingest_simpsons(SimpsonsConfig(source="local", path=str(csv_path), control_chars="drop", on_bad_rows="skip"))
    assert [x["text"] for x in pq.read_table(ref.dir / "lines.parquet").to_pylist()] == ["D'oh!", "Woo-hoo!"]
    counts = read_manifest(ref.dir)["counts"]
    assert (counts["rows_read"], counts["kept"], counts["skipped_bad_rows"], counts["dropped_control_chars"]) == (3, 2, 1, 1)

    articles = tmp_path / "articles.jsonl"
    articles.write_text("".join(json.dumps(r) + "\n" for r in [{"text": "Spring\x00field."}, {"text": 5}]), encoding="utf-8")
    ref = ingest_wikipedia(WikipediaConfig(source="local", path=str(articles), control_chars="drop", on_bad_rows="skip"))
    counts = read_manifest(ref.dir)["counts"]
    assert (counts["articles"], counts["skipped_bad_rows"], counts["dropped_control_chars"]) == (1, 1, 1)


def test_cli_names_the_users_file_and_row_for_a_bad_article(tmp_path, data_dir):
    from typer.testing import CliRunner

    from flows.cli import app

    path = tmp_path / "articles.jsonl"
    path.write_text('{"text": "fine"}\n{"text": 5}\n', encoding="utf-8")
    result = CliRunner().invoke(app, ["stage", "ingest-wikipedia", "--set", "wikipedia.source=local", "--set", f"wikipedia.path={path}"])
    assert result.exit_code == 1, result.output
    assert f"error: {path}: line 2: column text holds int 5, not text" in result.output and "wikipedia.on_bad_rows=skip" in result.output
    assert ".tmp-" not in result.output  # the user's file, never the staging directory
    out = data_dir / "ingest-wikipedia"
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")]


def test_each_stage_run_labels_itself_with_its_own_output_not_the_latest(data_dir, small_csv):
    from prefect.client.orchestration import get_client

    from flows.ingest_simpsons import ingest_simpsons
    from tasks.common import OUTPUT_LABEL, labelled_output

    homer = SimpsonsConfig(source="local", path=str(small_csv), character="Homer Simpson")
    marge = SimpsonsConfig(source="local", path=str(small_csv), character="Marge Simpson")
    made = ingest_simpsons(homer, return_state=True)
    other = ingest_simpsons(marge, return_state=True)
    reused = ingest_simpsons(homer, return_state=True)  # cached: labelled all the same
    ingest_simpsons(marge)  # `latest` moves on: the runs before keep naming their own outputs
    assert latest(data_dir, "ingest-simpsons").fingerprint == other.result().fingerprint
    with get_client(sync_client=True) as client:
        labels = {name: client.read_flow_run(state.state_details.flow_run_id).labels
                  for name, state in (("made", made), ("other", other), ("reused", reused))}
    assert labelled_output(labels["made"], "ingest-simpsons") == made.result().fingerprint == reused.result().fingerprint
    assert labelled_output(labels["reused"], "ingest-simpsons") == made.result().fingerprint
    assert labels["other"][OUTPUT_LABEL] == f"ingest-simpsons/{other.result().fingerprint}"
    assert labelled_output(labels["made"], "prepare") is None  # a label names its stage
