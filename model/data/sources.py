"""Source configs and readers: Wikipedia articles and the Simpsons dialogue lines.

Plain functions, no Prefect: the ingest tasks call them. Each reader yields rows and
reports what it dropped and why, so a manifest can count every row.

    cfg = WikipediaConfig(source="local", path="articles.jsonl", max_articles=100)
    for article in read_wikipedia(cfg): ...        # dicts: id, url, title, text
    lines, counts = read_simpsons_csv("simpsons_dataset.csv", "Homer Simpson")
"""

from __future__ import annotations

import codecs
import csv
import difflib
import hashlib
import logging
import os
import socket
import time
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Iterator, Literal
from urllib.parse import urlparse

import ftfy
from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)

SAMPLE_FILES = {"wikipedia": "wikipedia/articles.jsonl", "simpsons": "simpsons/simpsons_dataset.csv"}


def sample_file(source: Literal["wikipedia", "simpsons"]) -> Path:
    """A bundled sample file: package data of `model` (model/sample_data/, see its README.md).

    Resolved from the installed package, not the repository, so the sample profile works after
    a plain `pip install .` from any directory. The package is installed as files (never zipped),
    so the resource is a real path that datasets and csv can open.
    """
    path = resources.files("model").joinpath("sample_data", *SAMPLE_FILES[source].split("/"))
    return Path(os.fspath(path))


SAMPLE_WIKIPEDIA = sample_file("wikipedia")
SAMPLE_SIMPSONS = sample_file("simpsons")
SIMPSONS_COLUMNS = ("raw_character_text", "spoken_words")
ARTICLE_COLUMNS = ("id", "url", "title", "text")


class SourceError(ValueError):
    """A source cannot be read; the message names the file, row or field and the fix."""


class WikipediaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Literal["hub", "local", "sample"] = Field("hub", description="hub: stream from Hugging Face; local: a file or folder on disk; sample: the bundled articles")
    dataset: str = Field("wikimedia/wikipedia", description="Hugging Face dataset id (or a hub-format folder) for source=hub")
    config_name: str = Field("20231101.en", description="dataset config (the dump date and language) for source=hub")
    split: str = Field("train", description="dataset split to stream")
    path: str | None = Field(None, description="for source=local: a Parquet or JSON Lines file or folder with a `text` column, or a folder of .txt files (one article each)")
    max_articles: int = Field(8000, gt=0, description="take the first N articles of the stream")
    shuffle_buffer: int = Field(0, ge=0, description="if > 0, shuffle the stream with a seeded buffer of this size before taking N")
    seed: int = Field(0, description="seed of the shuffle buffer")
    retries: int = Field(2, ge=0, description="retries on network errors, with exponential backoff", json_schema_extra={"fingerprint": False})
    backoff_s: float = Field(1.0, ge=0, description="first retry delay in seconds; doubles each retry", json_schema_extra={"fingerprint": False})

    @model_validator(mode="after")
    def _path_for_local(self):
        if self.source == "local" and not self.path:
            raise ValueError("wikipedia.path is required when wikipedia.source=local")
        return self


class SimpsonsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Literal["kaggle", "local", "sample"] = Field("kaggle", description="kaggle: download with kagglehub; local: a CSV on disk; sample: the bundled CSV")
    handle: str = Field("pierremegret/dialogue-lines-of-the-simpsons", description="Kaggle dataset handle, optionally versioned (owner/name/versions/N)")
    file_name: str = Field("simpsons_dataset.csv", description="the CSV inside the downloaded data set")
    path: str | None = Field(None, description="for source=local: the CSV file (or a folder holding file_name)")
    character: str = Field("Homer Simpson", description="keep the lines whose raw_character_text is exactly this")

    @model_validator(mode="after")
    def _path_for_local(self):
        if self.source == "local" and not self.path:
            raise ValueError("simpsons.path is required when simpsons.source=local")
        return self


# ---------------------------------------------------------------------------- checks

HASH_LIMIT = 256 * 2**20  # sources up to this size are fingerprinted by content, larger ones by size and mtime


def files_stamp(path: Path) -> str:
    """A stamp of a file's or folder's content, so an edited source is ingested again."""
    path = Path(path)
    if not path.exists():
        return f"missing:{path}"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    by_content = sum(f.stat().st_size for f in files) <= HASH_LIMIT
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(path) if f != path else f.name).encode())
        if by_content:
            with open(f, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
        else:
            stat = f.stat()
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def source_stamp(cfg: "WikipediaConfig | SimpsonsConfig") -> str | None:
    """What a source's files hold, for the ingest fingerprint; None where only the config says (the hub, Kaggle)."""
    if cfg.source == "sample":
        return files_stamp(SAMPLE_WIKIPEDIA if isinstance(cfg, WikipediaConfig) else SAMPLE_SIMPSONS)
    if cfg.source == "local":
        return files_stamp(Path(cfg.path))
    if isinstance(cfg, WikipediaConfig) and Path(cfg.dataset).is_dir():  # a hub-format folder on disk
        return files_stamp(Path(cfg.dataset))
    return None


def check_utf8(path: Path) -> None:
    """Raise naming the line and byte offset of the first byte sequence that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                bad = offset + exc.start
                line += chunk[: exc.start].count(b"\n")
                raise SourceError(
                    f"{path}: line {line} (byte {bad}) is not valid UTF-8 ({chunk[exc.start:exc.start + 4]!r}); "
                    f"re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from None
            line += chunk.count(b"\n")
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise SourceError(f"{path}: ends in the middle of a UTF-8 sequence; the file is truncated or not UTF-8") from None


def check_file(path: Path, what: str, setting: str) -> None:
    if not path.exists():
        raise SourceError(f"{path}: no such {what}; check {setting}")
    if path.is_file() and path.stat().st_size == 0:
        raise SourceError(f"{path}: the {what} is empty; check {setting}")


# ---------------------------------------------------------------------------- Wikipedia


def _local_data_files(path: Path) -> tuple[str, list[str]]:
    """The datasets builder name and the files for a local Wikipedia source."""
    check_file(path, "file or folder", "wikipedia.path")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    by_kind = {
        "parquet": [f for f in files if f.suffix == ".parquet"],
        "json": [f for f in files if f.suffix in (".jsonl", ".json")],
        "text": [f for f in files if f.suffix == ".txt"],
    }
    for builder, chosen in by_kind.items():
        if chosen:
            for f in chosen:
                check_file(f, "file", "wikipedia.path")
                if builder != "parquet":
                    check_utf8(f)
            return builder, [str(f) for f in chosen]
    raise SourceError(f"{path}: found no .parquet, .jsonl/.json or .txt files; wikipedia.source=local needs one of those")


def _article(row: dict, index: int, titles: list[str] | None) -> dict:
    return {
        "id": str(row.get("id") if row.get("id") is not None else index),
        "url": str(row.get("url") or ""),
        "title": str(row.get("title") or (titles[index] if titles else "")),
        "text": row.get("text") or "",
    }


def probe_hub(timeout_s: float = 5.0) -> None:
    """Fail fast when the hub cannot be reached (datasets' own retries take ~30 s)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ConnectionError("HF_HUB_OFFLINE is set")
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # only a proxy can reach the hub here; let datasets use it
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    socket.create_connection((url.hostname, port), timeout=timeout_s).close()


def _open_stream(cfg: WikipediaConfig):
    import datasets  # heavy import, only where needed

    if cfg.source == "hub":
        if not Path(cfg.dataset).is_dir():  # a hub-format folder on disk needs no network
            probe_hub()
        stream = datasets.load_dataset(cfg.dataset, cfg.config_name, split=cfg.split, streaming=True)
        titles = None
    else:
        path = Path(cfg.path) if cfg.source == "local" else SAMPLE_WIKIPEDIA
        builder, files = _local_data_files(path)
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        stream = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
        # The text builder yields files in order but not their names: titles come from the file list,
        # which a shuffle buffer would scramble.
        titles = [Path(f).stem.replace("_", " ") for f in files] if builder == "text" and not cfg.shuffle_buffer else None
    if "text" not in (stream.column_names or ["text"]):
        where = {"hub": cfg.dataset, "local": cfg.path, "sample": SAMPLE_WIKIPEDIA}[cfg.source]
        raise SourceError(f"{where}: no `text` column (found {stream.column_names}); articles need a `text` column")
    if cfg.shuffle_buffer:
        stream = stream.shuffle(seed=cfg.seed, buffer_size=cfg.shuffle_buffer)
    return stream.take(cfg.max_articles), titles


def _is_network_error(exc: BaseException) -> bool:
    if any(isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)) for e in _chain(exc)):
        return True
    names = {type(e).__name__ for e in _chain(exc)}
    return bool(names & {"ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout", "ConnectError",
                         "OfflineModeIsEnabled", "HTTPError", "LocalEntryNotFoundError", "gaierror",
                         "TimeoutError", "ProxyError", "RemoteProtocolError"})


def _chain(exc: BaseException):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def read_wikipedia(cfg: WikipediaConfig, drops: Counter | None = None) -> Iterator[dict]:
    """Yield articles (id, url, title, text); articles with no text are dropped and counted."""
    drops = drops if drops is not None else Counter()
    attempt = yielded = 0  # rows consumed so far: a retried stream skips them
    while True:
        try:
            stream, titles = _open_stream(cfg)
            for index, row in enumerate(stream):
                if index < yielded:
                    continue  # a retried stream replays what was already yielded
                article = _article(row, index, titles)
                yielded += 1
                if not article["text"].strip():
                    drops["empty_text"] += 1
                    log.warning("article %s (%r, row %d) has no text; dropped", article["id"], article["title"], index)
                    continue
                yield article
            return
        except SourceError:
            raise
        except Exception as exc:
            if cfg.source != "hub":
                where = cfg.path if cfg.source == "local" else SAMPLE_WIKIPEDIA
                raise SourceError(f"{where}: could not read articles ({type(exc).__name__}: {exc})") from exc
            if not _is_network_error(exc) or attempt >= cfg.retries:
                raise SourceError(
                    f"could not stream {cfg.dataset} ({cfg.config_name}) from the Hugging Face hub "
                    f"({type(exc).__name__}: {str(exc)[:300]}). Offline? Use wikipedia.source=local with "
                    f"wikipedia.path=FILE, or wikipedia.source=sample for the bundled articles"
                ) from exc
            delay = cfg.backoff_s * 2**attempt
            attempt += 1
            log.warning("network error streaming %s (%s); retry %d/%d in %.1fs", cfg.dataset, exc, attempt, cfg.retries, delay)
            time.sleep(delay)


# ---------------------------------------------------------------------------- Simpsons


def download_simpsons(cfg: SimpsonsConfig) -> Path:
    """The CSV for the configured source; kaggle downloads (or reuses kagglehub's cache)."""
    if cfg.source == "sample":
        return SAMPLE_SIMPSONS
    if cfg.source == "local":
        path = Path(cfg.path)
        return path / cfg.file_name if path.is_dir() else path
    import kagglehub  # credentials: KAGGLE_USERNAME/KAGGLE_KEY or ~/.kaggle/kaggle.json, read by kagglehub

    try:
        folder = Path(kagglehub.dataset_download(cfg.handle))
    except Exception as exc:
        raise SourceError(
            f"could not download Kaggle data set {cfg.handle} ({type(exc).__name__}: {str(exc)[:300]}). "
            f"Offline? Use simpsons.source=local with simpsons.path=simpsons_dataset.csv, or simpsons.source=sample"
        ) from exc
    csv_path = folder / cfg.file_name
    if not csv_path.is_file():
        found = sorted(p.name for p in folder.iterdir())
        raise SourceError(f"{folder}: the Kaggle data set has no {cfg.file_name} (found {found}); set simpsons.file_name")
    return csv_path


def normalise_line(text: str) -> tuple[str, bool]:
    """Repair mis-encoded sequences (e.g. 'â€¦' for '…') and collapse whitespace.

    A bare 'â€' is left when the closing quote '”' (E2 80 9D) went through cp1252,
    which has no character for 9D; ftfy cannot see it, so it is mapped here.
    """
    fixed = ftfy.fix_encoding(text).replace("â€", "”")
    return " ".join(fixed.split()), fixed != text


def read_simpsons_csv(path: Path, character: str, setting: str = "simpsons.path") -> tuple[list[dict], dict]:
    """Keep the character's lines that have words, in file order; count every other row.

    Returns (lines, counts); each line is {"row": data row number (1 = first after the
    header), "text": normalised words}.
    """
    path = Path(path)
    check_file(path, "CSV file", setting)
    check_utf8(path)
    counts = Counter()
    speakers = Counter()
    kept = []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            raise SourceError(f"{path}: the CSV has no header row; expected columns {list(SIMPSONS_COLUMNS)}")
        header = [h.strip().lstrip("\ufeff") for h in header]
        missing = [c for c in SIMPSONS_COLUMNS if c not in header]
        if missing:
            raise SourceError(f"{path}: missing column(s) {missing}; found columns {header}, expected {list(SIMPSONS_COLUMNS)}")
        who_col, words_col = header.index(SIMPSONS_COLUMNS[0]), header.index(SIMPSONS_COLUMNS[1])
        width = max(who_col, words_col) + 1
        try:
            for row_no, row in enumerate(reader, start=1):
                counts["rows_read"] += 1
                row = row + [""] * (width - len(row))
                who, words = row[who_col].strip(), row[words_col]
                if not who and not words.strip():
                    counts["dropped_blank"] += 1
                elif who != character:
                    counts["dropped_other_character"] += 1
                    speakers[who] += 1
                elif not words.strip():
                    counts["dropped_no_words"] += 1
                else:
                    text, repaired = normalise_line(words)
                    counts["encoding_repairs"] += repaired
                    kept.append({"row": row_no, "text": text})
        except csv.Error as exc:
            raise SourceError(f"{path}: row {reader.line_num}: malformed CSV ({exc})") from exc
    counts["kept"] = len(kept)
    if not kept:
        close = difflib.get_close_matches(character, list(speakers), n=3, cutoff=0.5)
        common = [name for name, _ in speakers.most_common(5)]
        raise SourceError(
            f"{path}: no rows with words for simpsons.character={character!r} among {counts['rows_read']} rows; "
            f"close matches: {close or 'none'}; most frequent speakers: {common}. Check simpsons.character"
        )
    return kept, {k: counts[k] for k in ("rows_read", "kept", "dropped_blank", "dropped_other_character", "dropped_no_words", "encoding_repairs")}
