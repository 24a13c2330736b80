"""Data-stage tasks: ingest Wikipedia, ingest the Simpsons lines, prepare corpora and shards.

Each task takes its config section, its input refs and the artifact root, writes its
output through the artifact store (temporary directory, manifest, rename) and returns
a StageRef. The cache key is the output fingerprint, so a re-run is Cached.
"""

from __future__ import annotations

import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger, task

from model.data.prepare import PrepareConfig, corpus_char_counts, group_lines, write_corpus, write_shards
from model.data.sources import (SimpsonsConfig, SourceError, WikipediaConfig, download_simpsons, read_simpsons_csv, read_wikipedia,
                                wikipedia_location)
from model.store.outputs import StageRef, data_root, manifest_for, ref_for, staging, write_manifest
from model.data.vocab import build_vocab
from tasks.common import complete_ref, stage_cache_key, stage_fingerprint

ARTICLE_SCHEMA = pa.schema([("id", pa.string()), ("url", pa.string()), ("title", pa.string()), ("text", pa.string())])
LINE_SCHEMA = pa.schema([("row", pa.int64()), ("text", pa.string())])
WRITE_BATCH = 1000


@task(name="ingest-wikipedia", cache_key_fn=stage_cache_key("ingest-wikipedia"), persist_result=True)
def ingest_wikipedia_task(config: WikipediaConfig, root: str | None = None, inputs: dict | None = None) -> StageRef:
    stage, root = "ingest-wikipedia", data_root(root)
    fp = stage_fingerprint(stage, config)
    if ref := complete_ref(root, stage, fp):
        return ref
    log, started = get_run_logger(), time.monotonic()
    drops, articles, chars = Counter(), 0, 0
    with staging(root, stage, fp) as tmp:
        with pq.ParquetWriter(tmp / "articles.parquet", ARTICLE_SCHEMA, compression="zstd") as writer:
            batch = []
            for article in read_wikipedia(config, drops):
                batch.append(article)
                articles += 1
                chars += len(article["text"])
                if len(batch) == WRITE_BATCH:
                    writer.write_table(pa.Table.from_pylist(batch, schema=ARTICLE_SCHEMA))
                    batch = []
                    log.info("ingested %d articles", articles)
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema=ARTICLE_SCHEMA))
        if not articles:
            raise SourceError(f"{wikipedia_location(config)}: no article with text among the {drops['empty_text'] + drops['bad_rows']} rows "
                              f"read ({drops['empty_text']} with empty text, {drops['bad_rows']} skipped as bad rows); "
                              f"check wikipedia.source={config.source}" + (" and wikipedia.path" if config.source == "local" else ""))
        counts = {"articles": articles, "chars": chars, "dropped_empty_text": drops["empty_text"],
                  "skipped_bad_rows": drops["bad_rows"], "dropped_control_chars": drops["control_chars"],
                  "seconds": round(time.monotonic() - started, 2)}
        write_manifest(tmp, manifest_for(stage, fp, config, {}, counts))
    return ref_for(root, stage, fp)


@task(name="ingest-simpsons", cache_key_fn=stage_cache_key("ingest-simpsons"), persist_result=True)
def ingest_simpsons_task(config: SimpsonsConfig, root: str | None = None, inputs: dict | None = None) -> StageRef:
    stage, root = "ingest-simpsons", data_root(root)
    fp = stage_fingerprint(stage, config)
    if ref := complete_ref(root, stage, fp):
        return ref
    started = time.monotonic()
    csv_path = download_simpsons(config)
    setting = {"local": "simpsons.path", "sample": "the bundled sample", "kaggle": "simpsons.handle"}[config.source]
    lines, counts = read_simpsons_csv(csv_path, config.character, setting, config.control_chars, config.on_bad_rows)
    with staging(root, stage, fp) as tmp:
        pq.write_table(pa.Table.from_pylist(lines, schema=LINE_SCHEMA), tmp / "lines.parquet", compression="zstd")
        counts = dict(counts, chars=sum(len(x["text"]) for x in lines), seconds=round(time.monotonic() - started, 2))
        manifest = manifest_for(stage, fp, config, {}, counts)
        manifest["source_file"] = str(csv_path)
        write_manifest(tmp, manifest)
    return ref_for(root, stage, fp)


def _articles(ref: StageRef):
    for batch in pq.ParquetFile(ref.dir / "articles.parquet").iter_batches(batch_size=WRITE_BATCH, columns=["id", "text"]):
        yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())


def _lines(ref: StageRef):
    for batch in pq.ParquetFile(ref.dir / "lines.parquet").iter_batches(batch_size=WRITE_BATCH, columns=["text"]):
        yield from batch.column(0).to_pylist()


@task(name="prepare", cache_key_fn=stage_cache_key("prepare"), persist_result=True)
def prepare_task(config: PrepareConfig, inputs: dict[str, StageRef], root: str | None = None) -> StageRef:
    stage, root = "prepare", data_root(root)
    fp = stage_fingerprint(stage, config, inputs)
    if ref := complete_ref(root, stage, fp):
        return ref
    log, started = get_run_logger(), time.monotonic()
    with staging(root, stage, fp) as tmp:
        (tmp / "corpora").mkdir()
        corpora = {
            "wikipedia": write_corpus(_articles(inputs["wikipedia"]), tmp / "corpora" / "wikipedia.parquet"),
            "simpsons": write_corpus(group_lines(_lines(inputs["simpsons"]), config.lines_per_doc, "simpsons"),
                                     tmp / "corpora" / "simpsons.parquet"),
        }
        char_counts = Counter()
        for name in corpora:
            char_counts.update(corpus_char_counts(tmp / "corpora" / f"{name}.parquet"))
        vocab = build_vocab(char_counts, config.min_count)
        vocab.save(tmp / "vocab.json")
        log.info("vocabulary: %d entries (%s)", vocab.size, vocab.fingerprint)
        shards = {}
        for name in corpora:
            shards[name] = write_shards(tmp / "corpora" / f"{name}.parquet", vocab, tmp / "shards" / name, name, config)
            log.info("%s: %d train / %d val / %d test windows", name, *(shards[name][s]["windows"] for s in ("train", "val", "test")))
        counts = {
            "vocab_size": vocab.size,
            "vocab_fingerprint": vocab.fingerprint,
            "corpora": corpora,
            "shards": shards,
            "seconds": round(time.monotonic() - started, 2),
        }
        write_manifest(tmp, manifest_for(stage, fp, config, inputs, counts))
    return ref_for(root, stage, fp)
