"""Data-stage tasks: ingest Wikipedia, ingest the Simpsons lines, prepare corpora and shards.

Each stage task takes its config section, its input refs and the artifact root, writes its
output through the artifact store (temporary directory, manifest, rename) and returns
a StageRef. The cache key is the output fingerprint, so a re-run is Cached.

`prepare` is written by small mapped tasks (model.data.prepare explains the parts):
`prepare-corpus` per corpus, `prepare-count` per part, `prepare-vocab` once (with
tokenizer bpe: `prepare-bpe` once, before counting), `prepare-shards` per part,
`prepare-merge` per corpus. Each takes plain arguments and
writes its files into a location given as a string, `work`: the staging directory of the
output, or, for mapped tasks on other machines, a folder in the artifact root's object
store (`upload-<time>-<id>/` under the output, which `homer gc` treats as a writer's
folder) that the flow then copies into the staging directory. `write_prepare` runs the
steps with a runner: the `prepare` flow's maps them onto its task runner (threads or
Dask); `prepare_task`, run on its own, runs them one after the other in its process.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from model.data.prepare import (Part, PrepareConfig, PrepareError, count_part, merge_pieces, plan_parts, shard_counts,
                                shard_layout, simpsons_documents, split_of, wikipedia_documents, write_corpus, write_part_shards)
from model.data.shards import list_shards
from model.data.sources import (SimpsonsConfig, SourceError, WikipediaConfig, download_simpsons, read_simpsons, read_wikipedia,
                                wikipedia_location)
from model.store.outputs import StageRef, data_root, manifest_for, ref_for, remote_of, staging, write_manifest
from model.data.tokenizers import TOKENIZER_FILE, build_word_vocab, train_bpe, with_counts
from model.data.vocab import Vocab, build_vocab
from tasks.common import _logger, complete_ref, stage_cache_key, stage_fingerprint

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
    lines, counts = read_simpsons(csv_path, config, setting)
    with staging(root, stage, fp) as tmp:
        pq.write_table(pa.Table.from_pylist(lines, schema=LINE_SCHEMA), tmp / "lines.parquet", compression="zstd")
        counts = dict(counts, chars=sum(len(x["text"]) for x in lines), seconds=round(time.monotonic() - started, 2))
        manifest = manifest_for(stage, fp, config, {}, counts)
        manifest["source_file"] = str(csv_path)
        write_manifest(tmp, manifest)
    return ref_for(root, stage, fp)


# ---------------------------------------------------------------------------- prepare

CORPORA = ("wikipedia", "simpsons")
SOURCE_FILES = {"wikipedia": "articles.parquet", "simpsons": "lines.parquet"}  # in the ingest outputs
PIECES, SCRATCH = ".pieces", ".parts"  # under `work`: shards that parts share, a part's shard writer; removed at the end
ALL = 2**62  # "every document" for a reader's stop
PART_TASK = {"cache_policy": NO_CACHE, "persist_result": False}  # they write into a staging directory: never cached


def corpus_documents(corpus: str, source: StageRef, config: PrepareConfig) -> int:
    """How many documents the corpus has: articles, or groups of lines_per_doc lines (from the Parquet footer)."""
    rows = pq.ParquetFile(source.dir / SOURCE_FILES[corpus]).metadata.num_rows
    return rows if corpus == "wikipedia" else -(-rows // config.lines_per_doc)


def plan(config: PrepareConfig, inputs: dict[str, StageRef]) -> list[Part]:
    """The parts of both corpora, docs_per_part documents each, in corpus order."""
    return plan_parts({c: corpus_documents(c, inputs[c], config) for c in CORPORA}, config.docs_per_part)


def _source_file(corpus: str, source: StageRef) -> str:
    """The input file a corpus is read from, as messages name it (a URL for an input in an object store)."""
    return f"{source.path.rstrip('/')}/{SOURCE_FILES[corpus]}"


def _documents(corpus: str, source: StageRef, config: PrepareConfig, start: int, stop: int) -> Iterator[tuple[list[str], list[str]]]:
    """Batches of (doc_ids, texts) of documents [start, stop) of a corpus, read from its ingest output (downloaded if remote)."""
    path = source.dir / SOURCE_FILES[corpus]
    if corpus == "wikipedia":
        return wikipedia_documents(path, start, stop)
    return simpsons_documents(path, start, stop, config.lines_per_doc)


@contextlib.contextmanager
def _naming(what: str) -> Iterator[None]:
    """Any error of the block as a PrepareError that starts with `what` (the part and the file it reads)."""
    try:
        yield
    except Exception as exc:
        raise PrepareError(f"prepare: {what}: {type(exc).__name__}: {exc}") from exc


# -- work locations: a local folder, or a folder in the artifact root's object store


def _is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def _store(location: str):
    from model.store.remote import parse_root

    return parse_root(location)


@contextlib.contextmanager
def work_folder(work: str) -> Iterator[Path]:
    """A local folder standing for `work`: the folder itself, or for a URL a temporary one uploaded there on success."""
    if not _is_url(work):
        Path(work).mkdir(parents=True, exist_ok=True)
        yield Path(work)
        return
    store = _store(work)
    with tempfile.TemporaryDirectory(prefix="homer-part-") as tmp:
        yield Path(tmp)
        files = [f for f in sorted(Path(tmp).rglob("*")) if f.is_file()]
        if files:
            store.fs.put([str(f) for f in files], [store.path(f.relative_to(tmp).as_posix()) for f in files])


def work_vocab(work: str):
    """The vocabulary written at `work` (vocab.json, and a BPE's tokenizer.json beside it; for a URL: downloaded)."""
    if not _is_url(work):
        return Vocab.load(Path(work) / "vocab.json")
    store = _store(work)
    with tempfile.TemporaryDirectory(prefix="homer-part-") as tmp:
        for name in ("vocab.json", TOKENIZER_FILE):
            if name == "vocab.json" or store.fs.exists(store.path(name)):
                store.fs.get(store.path(name), str(Path(tmp) / name))
        return Vocab.load(Path(tmp) / "vocab.json")


@contextlib.contextmanager
def work_files(work: str, under: str) -> Iterator[Path]:
    """The files under `<work>/<under>` as a local folder (for a URL: a temporary download)."""
    if not _is_url(work):
        yield Path(work) / under
        return
    store = _store(work)
    with tempfile.TemporaryDirectory(prefix="homer-part-") as tmp:
        base = store.path(under)
        found = store.fs.find(base) if store.fs.exists(base) else []
        if found:
            store.fs.get(found, [str(Path(tmp) / f[len(base):].lstrip("/")) for f in found])
        yield Path(tmp)


def fetch_work(work: str, dest: Path) -> None:
    """Copy every file of a work URL into dest, but the scratch folders (.pieces, .parts)."""
    store = _store(work)
    base = store.path()
    found = [f for f in store.fs.find(base) if f[len(base):].lstrip("/").split("/", 1)[0] not in (PIECES, SCRATCH)]
    if found:
        store.fs.get(found, [str(dest / f[len(base):].lstrip("/")) for f in found])


def store_work_location(root: Path, fp: str) -> str | None:
    """For a root in an object store: a fresh writer's folder under the output, `<url>/prepare/<fp>/upload-<time>-<id>`."""
    remote = remote_of(root)
    if remote is None:
        return None
    from model.store.remote import UPLOAD_PREFIX

    return f"{remote.url}/prepare/{fp}/{UPLOAD_PREFIX}{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def remove_work(work: str) -> None:
    store = _store(work)
    with contextlib.suppress(FileNotFoundError):
        store.fs.rm(store.path(), recursive=True)


# -- the mapped tasks


@task(name="prepare-corpus", task_run_name="corpus-{corpus}", **PART_TASK)
def prepare_corpus_task(corpus: str, source: StageRef, config: PrepareConfig, work: str) -> dict:
    """Write `corpora/<corpus>.parquet` (doc_id, text) at `work`; returns its documents and characters."""
    with _naming(f"the {corpus} corpus, read from {_source_file(corpus, source)}"), work_folder(work) as out:
        batches = _documents(corpus, source, config, 0, ALL)
        (out / "corpora").mkdir(exist_ok=True)
        return write_corpus((doc for ids, texts in batches for doc in zip(ids, texts)), out / "corpora" / f"{corpus}.parquet")


@task(name="prepare-count", task_run_name="count-{part.name}", **PART_TASK)
def prepare_count_task(part: Part, source: StageRef, config: PrepareConfig, work: str | None = None) -> dict:
    """A part's character (or word) counts, and its documents and windows per split (model.data.prepare.count_part);
    writes nothing. With tokenizer bpe it counts tokens with the BPE already trained at `work`."""
    with _naming(f"{part.describe()}, read from {_source_file(part.corpus, source)}"):
        vocab = work_vocab(work) if config.tokenizer == "bpe" else None
        return count_part(_documents(part.corpus, source, config, part.start, part.stop), config, vocab)


def _saved(vocab, work: str) -> dict:
    with work_folder(work) as out:
        vocab.save(out / "vocab.json")
    return {"size": vocab.size, "fingerprint": vocab.fingerprint}


@task(name="prepare-vocab", **PART_TASK)
def prepare_vocab_task(counts_of_parts: list[dict[str, int]], config: PrepareConfig, work: str) -> dict:
    """The char or word vocabulary from every part's counts: `vocab.json` at `work`; returns its size and fingerprint."""
    counts: Counter = Counter()
    for part in counts_of_parts:
        counts.update(part)
    if config.tokenizer == "word":
        return _saved(build_word_vocab(counts, config.min_count, config.max_vocab), work)
    return _saved(build_vocab(counts, config.min_count), work)


@task(name="prepare-bpe", **PART_TASK)
def prepare_bpe_task(parts: list[Part], sources: list[StageRef], config: PrepareConfig, work: str) -> dict:
    """Train the byte-level BPE on the train documents of every part (in corpus order): `vocab.json` and
    `tokenizer.json` at `work`; returns its size and fingerprint."""
    def train_texts() -> Iterator[list[str]]:
        for part, source in zip(parts, sources):
            with _naming(f"{part.describe()}, read from {_source_file(part.corpus, source)}"):
                for doc_ids, texts in _documents(part.corpus, source, config, part.start, part.stop):
                    split = split_of(doc_ids, config.val_fraction, config.test_fraction, config.split_salt)  # (D,) 0 = train
                    yield [text for text, s in zip(texts, split.tolist()) if s == 0]

    vocab = train_bpe((text for texts in train_texts() for text in texts), config.vocab_size, config.min_count)
    return _saved(with_counts(vocab, train_texts()), work)


@task(name="prepare-shards", task_run_name="shards-{part.name}", **PART_TASK)
def prepare_shards_task(part: Part, source: StageRef, place: dict[str, dict[str, int]], config: PrepareConfig, work: str) -> dict:
    """Encode a part and write its shards at `work` where shard_layout placed them (`place`); returns its counts."""
    with _naming(f"{part.describe()}, read from {_source_file(part.corpus, source)}"):
        vocab = work_vocab(work)
        batches = _documents(part.corpus, source, config, part.start, part.stop)
        with work_folder(work) as out:
            return write_part_shards(batches, vocab, out / "shards" / part.corpus, out / PIECES / part.corpus,
                                     out / SCRATCH / part.name, part, place, config)


@task(name="prepare-merge", task_run_name="merge-{corpus}", **PART_TASK)
def prepare_merge_task(corpus: str, totals: dict[str, dict[str, int]], config: PrepareConfig, work: str) -> int:
    """Join the pieces of the shards the corpus's parts share; returns how many shards that made."""
    with _naming(f"merging the {corpus} shards that parts share"):
        vocab = work_vocab(work)
        with work_files(work, f"{PIECES}/{corpus}") as pieces, work_folder(work) as out:
            merged = merge_pieces(pieces, out / "shards" / corpus, out / SCRATCH / f"merge-{corpus}", corpus, totals,
                                  vocab, config)
        return merged


# -- the steps, and the stage task


class Sequential:
    """A runner for write_prepare that runs every task at once, in this process (prepare_task on its own)."""

    def map(self, task_, *mapped: list, **fixed: Any) -> list:
        return [task_.fn(*args, **fixed) for args in zip(*mapped)]

    def call(self, task_, *args: Any, **kwargs: Any) -> Any:
        return task_.fn(*args, **kwargs)

    def gather(self, handle: list) -> list:
        return handle

    def settle(self) -> None:
        pass


def write_prepare(config: PrepareConfig, inputs: dict[str, StageRef], root: Path, fp: str, runner, work_in_store: bool = False) -> StageRef:
    """Write the prepare output `fp`: corpora, vocabulary, shards and manifest; publish it; return its ref.

    runner.map(task, *lists, **fixed) starts a task per element of the lists, runner.gather
    waits for them and returns their results (raising the first failure once all have
    stopped), runner.call runs one task, runner.settle waits for every task started.
    work_in_store: the mapped tasks write into a folder in the root's object store (they may
    run on other machines), copied here at the end.
    """
    log, started = _logger(), time.monotonic()
    parts = plan(config, inputs)
    log.info("prepare: %d part(s) of at most %d documents: %s", len(parts), config.docs_per_part,
             ", ".join(f"{c} {sum(p.corpus == c for p in parts)}" for c in CORPORA))
    with staging(root, "prepare", fp) as tmp:
        work = (store_work_location(root, fp) if work_in_store else None) or str(tmp)
        try:
            corpora = runner.map(prepare_corpus_task, list(CORPORA), [inputs[c] for c in CORPORA], config=config, work=work)
            if config.tokenizer == "bpe":  # its token counts (and so the windows) depend on the trained merges
                vocab = runner.call(prepare_bpe_task, parts, [inputs[p.corpus] for p in parts], config, work)
            counted = runner.gather(runner.map(prepare_count_task, parts, [inputs[p.corpus] for p in parts], config=config, work=work))
            layout = shard_layout(parts, counted, config)
            if config.tokenizer != "bpe":
                counts_key = "word_counts" if config.tokenizer == "word" else "char_counts"
                vocab = runner.call(prepare_vocab_task, [c[counts_key] for c in counted], config, work)
            log.info("%s vocabulary: %d entries (%s)", config.tokenizer, vocab["size"], vocab["fingerprint"])
            written = runner.gather(runner.map(prepare_shards_task, parts, [inputs[p.corpus] for p in parts],
                                               [layout[p.name] for p in parts], config=config, work=work))
            totals = {p.corpus: layout[p.name] for p in parts}  # any part's layout holds its corpus's totals
            runner.gather(runner.map(prepare_merge_task, list(CORPORA), [totals[c] for c in CORPORA], config=config, work=work))
            corpora = dict(zip(CORPORA, runner.gather(corpora)))
            if work != str(tmp):
                fetch_work(work, tmp)
        except BaseException:
            runner.settle()  # no task may still be writing when the staging directory (or the store folder) goes
            raise
        finally:
            if work != str(tmp):
                remove_work(work)
        for scratch in (PIECES, SCRATCH):
            shutil.rmtree(tmp / scratch, ignore_errors=True)
        shards = {}
        for corpus in CORPORA:
            shards[corpus] = shard_counts([w for p, w in zip(parts, written) if p.corpus == corpus], totals[corpus])
            for split in ("train", "val", "test"):
                found = list_shards(tmp / "shards" / corpus, split)  # raises, naming a missing shard
                if len(found) != totals[corpus][split]["shards"]:
                    raise PrepareError(f"prepare: {len(found)} {corpus} {split} shards, {totals[corpus][split]['shards']} expected")
            log.info("%s: %d train / %d val / %d test windows", corpus, *(shards[corpus][s]["windows"] for s in ("train", "val", "test")))
        counts = {
            "tokenizer": config.tokenizer,
            "vocab_size": vocab["size"],
            "vocab_fingerprint": vocab["fingerprint"],
            "corpora": corpora,
            "shards": shards,
            "seconds": round(time.monotonic() - started, 2),
        }
        write_manifest(tmp, manifest_for("prepare", fp, config, inputs, counts))
    return ref_for(root, "prepare", fp)


@task(name="prepare", cache_key_fn=stage_cache_key("prepare"), persist_result=True)
def prepare_task(config: PrepareConfig, inputs: dict[str, StageRef], root: str | None = None) -> StageRef:
    """The prepare output: the complete one with this fingerprint (the `prepare` flow wrote it), else built here, one part at a time."""
    stage, root = "prepare", data_root(root)
    fp = stage_fingerprint(stage, config, inputs)
    if ref := complete_ref(root, stage, fp):
        return ref
    return write_prepare(config, inputs, root, fp, Sequential())
