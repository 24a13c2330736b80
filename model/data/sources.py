"""Source configs and readers: Wikipedia articles and the Simpsons dialogue lines.

Plain functions, no Prefect: the ingest tasks call them. Each reader yields rows and
reports what it dropped and why, so a manifest can count every row.

A local file is told from its bytes, not its name (`sniff`): gzip, bz2, xz and (with the
`zstandard` module) zstd are decompressed; UTF-8 with or without a BOM and UTF-16/32 with
a BOM are decoded; anything else (an archive, BOM-less UTF-16, legacy 8-bit text) is
refused naming what it is, the line and byte, and a command that converts it. CSV is
parsed strictly (an unterminated quote or a wrong number of fields names the row as a
spreadsheet numbers it); control characters (category Cc less tab and line breaks) and
values of the wrong type are errors naming file, row and column, or dropped / skipped
and counted (`control_chars`, `on_bad_rows`).

The fine-tuning lines come from any table of text: a CSV or Parquet file (a text column,
an optional filter column, or a str.format template over the columns), a .txt file or a
folder of .txt files (one line per row); the columns are checked before any row is read.

    cfg = WikipediaConfig(source="local", path="articles.jsonl", max_articles=100)
    for article in read_wikipedia(cfg): ...        # dicts: id, url, title, text
    lines, counts = read_simpsons_csv("simpsons_dataset.csv", "Homer Simpson")
    lines, counts = read_simpsons(Path("events.csv"), SimpsonsConfig(source="local", path="events.csv",
                                  character_column="", template="{minute}' {event_type}: {text}"))
"""

from __future__ import annotations

import bz2
import codecs
import csv
import difflib
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import random
import re
import shlex
import socket
import string
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Literal
from urllib.parse import urlparse

import ftfy
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
SIMPSONS_COLUMNS = ("raw_character_text", "spoken_words")  # the Kaggle file's: the default filter and text columns
ARTICLE_COLUMNS = ("id", "url", "title", "text")


CONTROL_CHARS_HELP = ("control characters in the text (Unicode category Cc: NUL, escape, ...; tab and line breaks are fine): "
                      "error names file, row and column; drop removes them, counted as dropped_control_chars in the manifest")


class SourceError(ValueError):
    """A source cannot be read; the message names the file, row or field and the fix."""


class WikipediaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Literal["hub", "local", "sample"] = Field("hub", description="hub: stream from Hugging Face; local: a file or folder on disk; sample: the bundled articles")
    dataset: str = Field("wikimedia/wikipedia", description="Hugging Face dataset id (or a hub-format folder) for source=hub")
    config_name: str = Field("20231101.en", description="dataset config (for wikimedia/wikipedia the dump date and language) for source=hub; empty: the data set's default config")
    text_column: str = Field("text", min_length=1, description="the column holding each article's text, for source=hub and for local Parquet or JSON Lines files (a .txt file is one article whatever this says)")
    split: str = Field("train", description="dataset split to stream")
    path: str | None = Field(None, description="for source=local: a Parquet or JSON Lines file or folder with the text column (text_column), or a folder of .txt files (one article each)")
    max_articles: int = Field(8000, gt=0, description="take the first N articles of the stream")
    shuffle_buffer: int = Field(0, ge=0, description="if > 0, shuffle the stream with a seeded buffer of this size before taking N")
    seed: int = Field(0, ge=0, description="seed of the shuffle buffer")
    control_chars: Literal["error", "drop"] = Field("error", description=CONTROL_CHARS_HELP)
    on_bad_rows: Literal["error", "skip"] = Field("error", description="a row that is not an article (a value of the wrong type, e.g. a number in `text`; a JSON Lines line that is not a JSON object): error names file, row and column; skip leaves it out, counted as skipped_bad_rows in the manifest")
    retries: int = Field(2, ge=0, le=100, description="retries on network errors, with exponential backoff", json_schema_extra={"fingerprint": False})
    backoff_s: float = Field(1.0, ge=0, le=3600, allow_inf_nan=False, description="first retry delay in seconds; doubles each retry", json_schema_extra={"fingerprint": False})

    @model_validator(mode="after")
    def _path_for_local(self):
        if self.source == "local" and not self.path:
            raise ValueError("wikipedia.path is required when wikipedia.source=local")
        return self

    @field_validator("config_name", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return "" if value is None else value  # `--set wikipedia.config_name=` reads as None


class SimpsonsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Literal["kaggle", "local", "sample"] = Field("kaggle", description="kaggle: download with kagglehub; local: a CSV, Parquet or .txt file, or a folder of .txt files, on disk; sample: the bundled CSV")
    handle: str = Field("pierremegret/dialogue-lines-of-the-simpsons", description="Kaggle dataset handle, optionally versioned (owner/name/versions/N)")
    file_name: str = Field("simpsons_dataset.csv", description="the CSV inside the downloaded data set")
    path: str | None = Field(None, description="for source=local: a CSV or Parquet file (told from its bytes), a .txt file (one row per non-blank line, no filter), or a folder holding file_name or else .txt files")
    text_column: str = Field(SIMPSONS_COLUMNS[1], min_length=1, description="the column holding each line's text (CSV and Parquet; unused when template is set)")
    character_column: str = Field(SIMPSONS_COLUMNS[0], description="the column to filter on: keep the rows whose value is exactly `character`; empty: keep every row (CSV and Parquet)")
    character: str = Field("Homer Simpson", description="the value of character_column to keep (for the Kaggle file: the speaker)")
    template: str = Field("", description="make each line from several columns with a str.format template of column names, e.g. \"{minute}' {event_type}: {text}\"; empty: the text_column as it is. A .txt row has one column, `text`")
    control_chars: Literal["error", "drop"] = Field("error", description=CONTROL_CHARS_HELP)
    on_bad_rows: Literal["error", "skip"] = Field("error", description="a row that cannot be used (a CSV row with the wrong number of fields, a value of the wrong type in a Parquet input): error names its row and column; skip leaves it out, counted as skipped_bad_rows in the manifest. An unterminated quote is always an error")

    @model_validator(mode="after")
    def _path_for_local(self):
        if self.source == "local" and not self.path:
            raise ValueError("simpsons.path is required when simpsons.source=local")
        return self

    @field_validator("character_column", "template", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return "" if value is None else value  # `--set simpsons.character_column=` reads as None

    @field_validator("template", mode="before")
    @classmethod
    def _template_as_text(cls, value: Any) -> Any:
        if isinstance(value, dict):  # `--set simpsons.template={text}`: YAML reads {text} as a mapping
            raise ValueError("the template was read as a YAML mapping; quote it: --set 'simpsons.template=\"{text}\"'")
        return value

    @field_validator("template")
    @classmethod
    def _template_parses(cls, template: str) -> str:
        if template:
            template_fields(template)  # a ValueError names what is wrong with it
        return template


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


# ---------------------------------------------------------------------------- what a file is, from its bytes

# Compression, told by the first bytes, never by the name: (magic, name, tool that decompresses it).
COMPRESSIONS = ((b"\x1f\x8b", "gzip", "gzip"), (b"BZh", "bz2", "bzip2"), (b"\xfd7zXZ\x00", "xz", "xz"),
                (b"\x28\xb5\x2f\xfd", "zstd", "zstd"))
COMPRESSION_SUFFIXES = (".gz", ".gzip", ".bz2", ".xz", ".zst", ".zstd")
# Containers no reader here opens as text: (magic, what it is, how to get the text out of it).
CONTAINERS = (
    (b"PK\x03\x04", "a zip archive (an .xlsx workbook is one too)",
     "unzip it (`unzip -l {file}` lists what it holds; save a workbook as CSV UTF-8)"),
    (b"PK\x05\x06", "an empty zip archive", "find the data file itself"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", "extract it (`7z x {file}`)"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an old Excel/Office document", "save it as CSV UTF-8"),
    (b"%PDF", "a PDF document", "find the data file itself"),
)
# Byte-order marks: UTF-32 before UTF-16 (FF FE 00 00 starts with FF FE).
BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32LE"), (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32BE"),
        (codecs.BOM_UTF8, "utf-8", "UTF-8"), (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16LE"),
        (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16BE"))
HEAD_BYTES = 4096  # what the sniffer reads (after decompression)
CHUNK_BYTES = 1 << 20
# Unicode category Cc (C0, DEL, C1) less tab, line feed and carriage return.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
C0_NAMES = ("NUL SOH STX ETX EOT ENQ ACK BEL BS HT LF VT FF CR SO SI DLE DC1 DC2 DC3 DC4 NAK SYN ETB CAN EM SUB ESC "
            "FS GS RS US").split()


def _zstandard():
    try:
        import zstandard  # optional: only zstd-compressed inputs need it
    except ImportError:
        return None
    return zstandard


@dataclass(frozen=True)
class FileKind:
    """What a file holds, told from its bytes: compression, then Parquet, a container or text in an encoding."""

    path: Path
    compression: str | None = None  # gzip, bz2, xz, zstd
    content: str = "text"  # text, parquet, or "unreadable" (then `what` and `fix` say why)
    encoding: str = "utf-8"  # the Python codec of text (no BOM: UTF-8 is assumed and checked as it is read)
    bom: int = 0  # bytes of byte-order mark to skip
    bom_name: str | None = None  # e.g. UTF-16LE, when a BOM said so
    what: str = ""  # for an unreadable file: what it is
    fix: str = ""  # for an unreadable file: what to do ({file} is filled in)
    out: Path | None = None  # the readable file that `fix` makes, where it names one
    head: bytes = b""  # the first bytes after decompression

    @property
    def label(self) -> str:
        inner = {"parquet": "a Parquet file"}.get(self.content) or (f"{self.bom_name} text with a byte-order mark" if self.bom_name else "text")
        return f"{self.compression}-compressed {inner}" if self.compression else inner

    def refusal(self, setting: str) -> str:
        fix = self.fix.replace("{file}", shlex.quote(str(self.path)))
        return f"{self.path}: the file is {self.what}; {fix}, then {_redirect(setting, self.out)}"


def _tool(compression: str) -> str:
    return next(tool for _, name, tool in COMPRESSIONS if name == compression)


def _plain_name(path: Path) -> Path:
    """The path without a compression suffix (a.csv.gz -> a.csv)."""
    return path.with_suffix("") if path.suffix.lower() in COMPRESSION_SUFFIXES else path


def _converted_name(path: Path, tag: str) -> Path:
    """Where a converted copy of `path` can go: a.csv -> a.<tag>.csv, next to it."""
    plain = _plain_name(path)
    return plain.with_name(f"{plain.stem}.{tag}{plain.suffix}")


def _redirect(setting: str, new: Path | None) -> str:
    """How to read another file instead (None: the one the user gets out): the setting that names the path, or a local source."""
    shown = shlex.quote(str(new)) if new is not None else "<that file>"
    if setting.endswith(".path"):
        return f"set {setting}={shown}"
    source = setting.split(".")[0] if setting.split(".")[0] in ("simpsons", "wikipedia") else "simpsons"
    return f"use {source}.source=local with {source}.path={shown}"


def _open_compressed(path: Path, compression: str | None):
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "bz2":
        return bz2.open(path, "rb")
    if compression == "xz":
        return lzma.open(path, "rb")
    if compression == "zstd":
        return _zstandard().ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True, read_across_frames=True)
    return open(path, "rb")


def _decompression_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, lzma.LZMAError)
    if (zstandard := _zstandard()) is not None:
        errors += (zstandard.ZstdError,)
    return errors


def _damaged(path: Path, compression: str, exc: BaseException) -> SourceError:
    return SourceError(f"{path}: the file is {compression}-compressed but its data is damaged or cut short "
                       f"({type(exc).__name__}: {exc}); download or compress it again "
                       f"(`{_tool(compression)} -t {shlex.quote(str(path))}` checks a copy)")


def sniff(path: Path) -> FileKind:
    """Tell what a file holds from its first bytes: compression, Parquet, an archive, or text in some encoding."""
    path = Path(path)
    with open(path, "rb") as handle:
        magic = handle.read(8)
    compression = next((name for sig, name, _ in COMPRESSIONS if magic.startswith(sig)), None)
    if compression == "zstd" and _zstandard() is None:
        plain = _plain_name(path) if _plain_name(path) != path else _converted_name(path, "decompressed")
        return FileKind(path, compression, "unreadable",
                        what="zstd-compressed, and this Python has no `zstandard` module to read it",
                        fix=(f"install the module (`pip install zstandard`), or decompress it first "
                             f"(`zstd -dc {{file}} > {shlex.quote(str(plain))}`)"), out=plain)
    if compression:
        try:
            with _open_compressed(path, compression) as raw:
                head = raw.read(HEAD_BYTES)
        except _decompression_errors() as exc:
            raise _damaged(path, compression, exc) from None
    else:
        with open(path, "rb") as handle:
            head = handle.read(HEAD_BYTES)
    if head.startswith(b"PAR1"):
        if compression:
            plain = _plain_name(path) if _plain_name(path) != path else _converted_name(path, "decompressed")
            return FileKind(path, compression, "unreadable", what=f"a {compression}-compressed Parquet file, which must be read uncompressed",
                            fix=f"decompress it (`{_tool(compression)} -dc {{file}} > {shlex.quote(str(plain))}`)", out=plain, head=head)
        return FileKind(path, None, "parquet", head=head)
    for sig, what, fix in CONTAINERS:
        if head.startswith(sig):
            return FileKind(path, compression, "unreadable", what=(f"{compression}-compressed " if compression else "") + what,
                            fix=fix, head=head)
    for bom, codec, name in BOMS:
        if head.startswith(bom):
            return FileKind(path, compression, "text", codec, len(bom), name, head=head)
    if no_bom := _utf16_or_32_without_bom(head):
        out = _converted_name(path, "utf8")
        source = (f"{_tool(compression)} -dc {{file}} | iconv -f {no_bom} -t UTF-8" if compression
                  else f"iconv -f {no_bom} -t UTF-8 {{file}}")
        return FileKind(path, compression, "unreadable", what=f"{no_bom} text without a byte-order mark (its bytes alternate with zeros)",
                        fix=f"convert it (`{source} > {shlex.quote(str(out))}`)", out=out, head=head)
    return FileKind(path, compression, "text", head=head)


def _utf16_or_32_without_bom(head: bytes) -> str | None:
    """UTF-16/32 text with no BOM: mostly-ASCII text has a zero in the same byte lanes of each code unit."""
    for width, names in ((4, ("UTF-32LE", "UTF-32BE")), (2, ("UTF-16LE", "UTF-16BE"))):
        units = len(head) // width
        if units < 4:
            continue
        lanes = [sum(1 for i in range(lane, units * width, width) if head[i] == 0) / units for lane in range(width)]
        if width == 4:
            if min(lanes[1:]) > 0.9 and lanes[0] < 0.5:
                return names[0]
            if min(lanes[:3]) > 0.9 and lanes[3] < 0.5:
                return names[1]
        else:
            if lanes[1] > 0.6 and lanes[0] < 0.2:
                return names[0]
            if lanes[0] > 0.6 and lanes[1] < 0.2:
                return names[1]
    return None


def _guess_encoding(data: bytes) -> tuple[str, str] | None:
    """(iconv name, description) of a legacy encoding that `data` plausibly is, or None; a guess, said as one."""
    high = [b for b in data if b >= 0x80]
    if not high:
        return None
    try:
        as_1252 = data.decode("cp1252")
    except UnicodeDecodeError:
        as_1252 = None
    if as_1252 is not None:
        odd = [c for c in as_1252 if ord(c) >= 0x80]
        # Western text: accented letters and typographic punctuation, rarely three in a row.
        runs = re.findall(r"[^\x00-\x7f]{3,}", as_1252)
        if all(c.isalpha() or unicodedata.category(c)[0] in "PSZ" for c in odd) and sum(map(len, runs)) <= len(odd) // 3:
            return "CP1252", "Windows-1252 (Western European)"
    try:
        as_1251 = data.decode("cp1251")
    except UnicodeDecodeError:
        return None
    odd = [c for c in as_1251 if ord(c) >= 0x80]
    if sum("\u0400" <= c <= "\u04ff" for c in odd) >= 0.8 * len(odd):
        return "CP1251", "Windows-1251 (Cyrillic)"
    return None


def _not_utf8(kind: FileKind, setting: str, line: int, offset: int, data: bytes, start: int) -> SourceError:
    path, where = kind.path, f"byte {offset}" + (" of the decompressed data" if kind.compression else "")
    out = _converted_name(path, "utf8")
    guess = _guess_encoding(data[max(0, start - 2048): start + 2048])
    encoding = guess[0] if guess else "ENCODING"
    command = (f"{_tool(kind.compression)} -dc {shlex.quote(str(path))} | iconv -f {encoding} -t UTF-8" if kind.compression
               else f"iconv -f {encoding} -t UTF-8 {shlex.quote(str(path))}")
    command += f" > {shlex.quote(str(out))}"
    said = (f"its bytes look like {guess[1]} text (a guess: if the file was saved in another encoding, put that one after -f)"
            if guess else f"its encoding is not one this reader can guess (`file -i {shlex.quote(str(path))}` or the program "
                          f"that wrote it may tell; put it in place of ENCODING)")
    return SourceError(f"{path}: line {line} ({where}) is not valid UTF-8 ({data[start:start + 4]!r}); {said}. "
                       f"Convert it: `{command}`, then {_redirect(setting, out)}")


def read_lines(kind: FileKind, setting: str) -> Iterator[str]:
    """The text lines of a file (line ends kept), decompressed and decoded as `kind` says.

    Bytes that are not valid in the encoding raise a SourceError naming the line and byte
    offset and how to convert the file; damaged compressed data raises naming the file.
    """
    if kind.content != "text":
        raise SourceError(kind.refusal(setting) if kind.content == "unreadable" else f"{kind.path}: the file is {kind.label}, not text")
    decoder = codecs.getincrementaldecoder(kind.encoding)()
    offset, line, pending = 0, 1, ""
    errors = _decompression_errors()
    with _open_compressed(kind.path, kind.compression) as raw:
        try:
            if kind.bom:
                offset = len(raw.read(kind.bom))
            while True:
                chunk = raw.read(CHUNK_BYTES)
                final = not chunk
                buffered = decoder.getstate()[0]
                try:
                    text = decoder.decode(chunk, final=final)
                except UnicodeDecodeError as exc:
                    data = buffered + chunk
                    before = data[: exc.start].decode(kind.encoding, errors="replace").count("\n")
                    bad_line, bad_offset = line + before, offset - len(buffered) + exc.start
                    if kind.encoding == "utf-8":
                        raise _not_utf8(kind, setting, bad_line, bad_offset, data, exc.start) from None
                    raise SourceError(f"{kind.path}: line {bad_line} (byte {bad_offset}) is not valid {kind.bom_name} "
                                      f"although the file starts with a {kind.bom_name} byte-order mark; the file is damaged "
                                      f"or mixes encodings: export it again as UTF-8") from None
                offset += len(chunk)
                line += text.count("\n")
                pending += text
                # Whole lines up to the last \n (so no \r\n is split); \r, \n and \r\n end lines, as csv expects.
                cut = len(pending) if final else pending.rfind("\n") + 1
                if cut:
                    block, pending = pending[:cut], pending[cut:]
                    yield from io.StringIO(block, newline="")
                if final:
                    return
        except errors as exc:
            if not kind.compression:
                raise
            raise _damaged(kind.path, kind.compression, exc) from None


def read_text(path: Path, setting: str) -> str:
    """A whole text file, decompressed and decoded from its bytes."""
    kind = sniff(path)
    return "".join(read_lines(kind, setting))


def check_utf8(path: Path, setting: str = "the file") -> None:
    """Raise naming the line and byte offset of the first bytes that are not valid text (UTF-8 unless a BOM says otherwise)."""
    for _ in read_lines(sniff(path), setting):
        pass


def check_file(path: Path, what: str, setting: str) -> None:
    if not path.exists():
        raise SourceError(f"{path}: no such {what}; check {setting}")
    if path.is_file() and path.stat().st_size == 0:
        raise SourceError(f"{path}: the file is empty (0 bytes); check {setting}")


def column_letter(index: int) -> str:
    """A spreadsheet's name for a 0-based column: 0 -> A, 26 -> AA."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(65 + rest) + letters
    return letters


def control_chars(value: str, where: str, column: str, mode: str, drops: Counter, source: str) -> str:
    """`value` with no control characters: error names where, or drop removes them and counts them."""
    match = CONTROL_CHARS.search(value)
    if match is None:
        return value
    if mode == "drop":
        cleaned, n = CONTROL_CHARS.subn("", value)
        drops["control_chars"] += n
        return cleaned
    char = match.group()
    code = ord(char)
    name = C0_NAMES[code] if code < 0x20 else "DEL" if code == 0x7f else "a C1 control character"
    raise SourceError(f"{where}, column {column}: control character U+{ord(char):04X} ({name}) at character {match.start() + 1}; "
                      f"remove it from the file, or set {source}.control_chars=drop to drop such characters "
                      f"(counted as dropped_control_chars in the manifest)")


def bad_row(where: str, message: str, mode: str, drops: Counter, source: str) -> None:
    """A row that cannot be used: raise (on_bad_rows=error) or count and log it (skip)."""
    if mode == "skip":
        drops["bad_rows"] += 1
        log.warning("%s: %s; skipped (%s.on_bad_rows=skip)", where, message, source)
        return
    raise SourceError(f"{where}: {message}; fix the file, or set {source}.on_bad_rows=skip to skip such rows "
                      f"(counted as skipped_bad_rows in the manifest)")


def _type_name(value: Any) -> str:
    return type(value).__name__


def wrong_type(column: str, value: Any) -> str:
    shown = repr(value)
    return f"column {column} holds {_type_name(value)} {shown[:40] + ('…' if len(shown) > 40 else '')}, not text"


# ---------------------------------------------------------------------------- Wikipedia

ARTICLE_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".ndjson": "json", ".json": "json", ".txt": "text"}


def _article_format(kind: FileKind, single: bool) -> tuple[str | None, str]:
    """(format, why not) of a local Wikipedia file: parquet by its bytes; JSON or text by its name, or its first byte when it is the only file."""
    if kind.content == "parquet":
        return "parquet", ""
    if kind.content != "text":
        return None, kind.what
    named = ARTICLE_FORMATS.get(_plain_name(kind.path).suffix.lower())
    if named == "parquet":
        return None, f"named .parquet but it is {kind.label}, not Parquet (it starts with {kind.head[:8]!r})"
    if named:
        return named, ""
    if single:
        start = kind.head[kind.bom:].decode(kind.encoding, errors="ignore").lstrip()[:1]
        return ("json" if start in ("{", "[") else "text"), ""
    return None, f"{kind.label}, but not named .parquet, .jsonl/.json or .txt"


def _local_files(path: Path) -> list[tuple[FileKind, str]]:
    """The files of a local Wikipedia source with their formats; a folder is read whole or refused naming what is left out."""
    check_file(path, "file or folder", "wikipedia.path")
    if path.is_file():
        kind = sniff(path)
        fmt, why = _article_format(kind, single=True)
        if kind.content == "unreadable":
            raise SourceError(kind.refusal("wikipedia.path"))
        if fmt is None:
            raise SourceError(f"{path}: the file is {why}; write it as Parquet, or name it .jsonl (JSON Lines) or .txt (one article)")
        return [(kind, fmt)]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise SourceError(f"{path}: the folder holds no files; wikipedia.path needs Parquet, JSON Lines or .txt files")
    chosen, left_out = [], []
    for f in files:
        if f.stat().st_size == 0:
            left_out.append((f, "empty (0 bytes)"))
            continue
        try:
            kind = sniff(f)
        except SourceError as exc:
            left_out.append((f, str(exc).split(": ", 1)[1]))
            continue
        fmt, why = _article_format(kind, single=False)
        if fmt is None:
            left_out.append((f, why))
        else:
            chosen.append((kind, fmt))
    if left_out:
        shown = "; ".join(f"{f.relative_to(path)} ({why})" for f, why in left_out[:10])
        more = f"; and {len(left_out) - 10} more" if len(left_out) > 10 else ""
        raise SourceError(
            f"{path}: {len(left_out)} of {len(files)} files cannot be read as articles, so the folder would not be read whole: "
            f"{shown}{more}. Move them out of the folder (or convert them to .parquet, .jsonl or UTF-8 .txt), "
            f"or set wikipedia.path to one file")
    return chosen


def _title_of(path: Path) -> str:
    return _plain_name(path).stem.replace("_", " ")


def _parquet_file(path: Path):
    """(pyarrow ParquetFile, its column names); a file pyarrow cannot open is an error naming it."""
    import pyarrow.parquet as pq  # only Parquet inputs need it

    try:
        parquet = pq.ParquetFile(path)
        return parquet, parquet.schema_arrow.names
    except Exception as exc:
        raise SourceError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc}); write it again") from exc


def _parquet_rows(path: Path, columns: tuple[str, ...], required: tuple[str, ...], needs: str) -> Iterator[tuple[int, dict]]:
    """(row number from 1, row) of a Parquet file, the `columns` it has; a missing `required` column is an error."""
    parquet, names = _parquet_file(path)
    missing = [c for c in required if c not in names]
    if missing:
        raise SourceError(f"{path}: no {', '.join(f'`{c}`' for c in missing)} column (found {names}); {needs}")
    if parquet.metadata.num_rows == 0:
        raise SourceError(f"{path}: the Parquet file holds no rows (only its schema {names}); it is empty")
    number = 0
    for batch in parquet.iter_batches(batch_size=1000, columns=[c for c in columns if c in names]):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _json_rows(kind: FileKind, drops: Counter, cfg: "WikipediaConfig") -> Iterator[tuple[dict, str, str]]:
    """Rows of JSON Lines (one object a line) or of one JSON array of objects."""
    lines = read_lines(kind, "wikipedia.path")
    first = True
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if first and line.lstrip().startswith("["):  # a JSON array of articles, not JSON Lines
            yield from _json_array(kind, line + "".join(lines), drops, cfg)
            return
        where = f"{kind.path}: line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            bad_row(where, f"not valid JSON ({exc.msg} at column {exc.colno}); JSON Lines needs one object per line",
                    cfg.on_bad_rows, drops, "wikipedia")
            continue
        if not isinstance(row, dict):
            bad_row(where, f"holds a JSON {_json_type(row)}, not an object with a `{cfg.text_column}` field", cfg.on_bad_rows, drops, "wikipedia")
            continue
        if first and cfg.text_column not in row:
            raise SourceError(f"{where}: no `{cfg.text_column}` field (found {sorted(row)}); {_text_column_needed(cfg, list(row))}")
        first = False
        yield row, where, ""
    if first:
        raise SourceError(f"{kind.path}: holds no JSON objects (only blank lines); the file is empty")


def _json_array(kind: FileKind, text: str, drops: Counter, cfg: "WikipediaConfig") -> Iterator[tuple[dict, str, str]]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{kind.path}: line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(rows, list):
        raise SourceError(f"{kind.path}: holds a JSON {_json_type(rows)}; articles need JSON Lines (one object a line) or an array of objects")
    if not rows:
        raise SourceError(f"{kind.path}: the JSON array is empty; the file holds no articles")
    for number, row in enumerate(rows, start=1):
        where = f"{kind.path}: item {number} of the array"
        if not isinstance(row, dict):
            bad_row(where, f"is a JSON {_json_type(row)}, not an object with a `{cfg.text_column}` field", cfg.on_bad_rows, drops, "wikipedia")
            continue
        yield row, where, ""


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")


def _text_column_needed(cfg: "WikipediaConfig", found: list[str]) -> str:
    """What to do about a missing text column: the setting, and the closest column the source has."""
    close = difflib.get_close_matches(cfg.text_column, [str(c) for c in found], n=1, cutoff=0.5)
    guess = f" (did you mean {close[0]!r}?)" if close else ""
    return f"articles need a `{cfg.text_column}` column: set wikipedia.text_column to the column that holds the text{guess}"


def _article_columns(cfg: "WikipediaConfig") -> tuple[str, ...]:
    """The source columns an article is made of: id, url, title and the text column."""
    return tuple(c for c in ARTICLE_COLUMNS if c != "text") + (cfg.text_column,)


def _local_rows(path: Path, cfg: "WikipediaConfig", drops: Counter) -> Iterator[tuple[dict, str, str]]:
    """(row, where, default title) of every local file, in path order."""
    for kind, fmt in _local_files(path):
        if fmt == "parquet":
            _, names = _parquet_file(kind.path)
            for number, row in _parquet_rows(kind.path, _article_columns(cfg), (cfg.text_column,), _text_column_needed(cfg, names)):
                yield row, f"{kind.path}: row {number}", ""
        elif fmt == "json":
            yield from _json_rows(kind, drops, cfg)
        else:
            yield {cfg.text_column: read_text(kind.path, "wikipedia.path")}, str(kind.path), _title_of(kind.path)


def _shuffled(rows: Iterator, buffer_size: int, seed: int) -> Iterator:
    """A seeded shuffle buffer: hold `buffer_size` rows, yield a random one as each new row comes in."""
    rng, buffer = random.Random(seed), []
    for row in rows:
        if len(buffer) < buffer_size:
            buffer.append(row)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = row
    rng.shuffle(buffer)
    yield from buffer


def _article(row: Any, index: int, where: str, title: str, cfg: "WikipediaConfig", drops: Counter) -> dict | None:
    """An article from a row, its strings checked; None when the row is skipped (on_bad_rows=skip)."""
    if not isinstance(row, dict):
        bad_row(where, f"holds {_type_name(row)}, not a record", cfg.on_bad_rows, drops, "wikipedia")
        return None
    article = {}
    for column, source in zip(ARTICLE_COLUMNS, (*ARTICLE_COLUMNS[:-1], cfg.text_column)):  # `text` from the text column
        value = row.get(source)
        if value is None or value == "":
            value = {"id": str(index), "title": title}.get(column, "")
        elif column == "id" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        elif not isinstance(value, str):
            bad_row(where, wrong_type(source, value), cfg.on_bad_rows, drops, "wikipedia")
            return None
        article[column] = control_chars(value, where, source, cfg.control_chars, drops, "wikipedia")
    return article


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
    """The hub stream (or a hub-format folder on disk) and its titles (None: the rows carry them)."""
    import datasets  # heavy import, only where needed

    if not Path(cfg.dataset).is_dir():  # a hub-format folder on disk needs no network
        probe_hub()
    stream = datasets.load_dataset(cfg.dataset, cfg.config_name or None, split=cfg.split, streaming=True)
    if (names := stream.column_names) is not None:  # None: the stream does not say before its first row
        if cfg.text_column not in names:
            raise SourceError(f"{wikipedia_location(cfg)}: no `{cfg.text_column}` column (found {names}); {_text_column_needed(cfg, names)}")
        stream = stream.select_columns([c for c in _article_columns(cfg) if c in names])  # leave other columns (images, ...) undecoded
    if cfg.shuffle_buffer:
        stream = stream.shuffle(seed=cfg.seed, buffer_size=cfg.shuffle_buffer)
    return stream.take(cfg.max_articles), None


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


def wikipedia_location(cfg: WikipediaConfig) -> str:
    """Where the articles come from, as the user named it."""
    return {"hub": f"{cfg.dataset} ({cfg.config_name or 'default config'})", "local": str(cfg.path), "sample": str(SAMPLE_WIKIPEDIA)}[cfg.source]


def read_wikipedia(cfg: WikipediaConfig, drops: Counter | None = None) -> Iterator[dict]:
    """Yield articles (id, url, title, text); empty articles are dropped and counted.

    `drops` counts `empty_text`, `bad_rows` (skipped, on_bad_rows=skip) and `control_chars`
    (characters removed, control_chars=drop). Local files are read here, whatever their
    compression and text encoding (see `sniff`); the hub streams through `datasets`.
    """
    drops = drops if drops is not None else Counter()
    if cfg.source != "hub":
        yield from _read_local(cfg, drops)
        return
    attempt = yielded = 0  # rows consumed so far: a retried stream skips them
    while True:
        try:
            stream, titles = _open_stream(cfg)
            for index, row in enumerate(stream):
                if index < yielded:
                    continue  # a retried stream replays what was already yielded
                yielded += 1
                where = f"{wikipedia_location(cfg)}: row {index + 1}"
                article = _article(row, index, where, titles[index] if titles else "", cfg, drops)
                if article is not None and _has_text(article, where, drops):
                    yield article
            return
        except SourceError:
            raise
        except Exception as exc:
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


def _has_text(article: dict, where: str, drops: Counter) -> bool:
    if article["text"].strip():
        return True
    drops["empty_text"] += 1
    log.warning("%s: article %s (%r) has no text; dropped", where, article["id"], article["title"])
    return False


def _read_local(cfg: WikipediaConfig, drops: Counter) -> Iterator[dict]:
    path = Path(cfg.path) if cfg.source == "local" else SAMPLE_WIKIPEDIA
    rows = _local_rows(path, cfg, drops)
    if cfg.shuffle_buffer:
        rows = _shuffled(rows, cfg.shuffle_buffer, cfg.seed)
    taken = 0
    try:
        for index, (row, where, title) in enumerate(rows):
            if index >= cfg.max_articles:
                break
            taken += 1
            article = _article(row, index, where, title, cfg, drops)
            if article is not None and _has_text(article, where, drops):
                yield article
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"{path}: could not read articles ({type(exc).__name__}: {exc})") from exc
    if not taken and not drops["bad_rows"]:
        raise SourceError(f"{path}: holds no articles (no rows); check wikipedia.path")



# ---------------------------------------------------------------------------- Simpsons


def download_simpsons(cfg: SimpsonsConfig) -> Path:
    """The file (or folder of .txt files) for the configured source; kaggle downloads (or reuses kagglehub's cache)."""
    if cfg.source == "sample":
        return SAMPLE_SIMPSONS
    if cfg.source == "local":
        path = Path(cfg.path)
        if path.is_dir() and (path / cfg.file_name).exists():
            return path / cfg.file_name
        return path  # a file, or a folder of .txt files
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


def repair_line(text: str) -> tuple[str, bool]:
    """Repair mis-encoded sequences (e.g. 'â€¦' for '…'); True when something changed.

    A bare 'â€' is left when the closing quote '”' (E2 80 9D) went through cp1252,
    which has no character for 9D; ftfy cannot see it, so it is mapped here.
    """
    fixed = ftfy.fix_encoding(text).replace("â€", "”")
    return fixed, fixed != text


def normalise_line(text: str) -> tuple[str, bool]:
    """Repair mis-encoded sequences (see `repair_line`) and collapse whitespace."""
    fixed, repaired = repair_line(text)
    return " ".join(fixed.split()), repaired


SIMPSONS_COUNTS = ("rows_read", "kept", "dropped_blank", "dropped_other_character", "dropped_no_words",
                   "skipped_bad_rows", "dropped_control_chars", "encoding_repairs")


def _csv_problem(exc: csv.Error, line: int) -> str:
    said = str(exc)
    if "unexpected end of data" in said:
        return ("a quoted field opens in this row and is never closed (the quote runs to the end of the file); "
                "close the quote, or double a quote that belongs to the text (\"\")")
    if "expected after" in said:
        return (f"a quote ends a quoted field but the field goes on (at line {line}): a quoted field opened in this row "
                f"is not closed where it should be, or a quote inside it is not doubled (\"\"); fix the quotes of this row")
    return f"malformed CSV ({said})"


def _csv_table(kind: FileKind, setting: str, on_bad_rows: str, drops: Counter, expected: list[str]) -> tuple[list[str], Iterator[tuple[str, dict | None]]]:
    """(header, rows) of a CSV file, parsed strictly: the header is read now, the rows as they are iterated.

    A row is (where, {column: value}), or (where, None) for a bad row skipped. `where` names
    the row as a spreadsheet does (the header is row 1) and its line when they differ. An
    unterminated quote is an error naming the row where it opens; a row with a number of
    fields other than the header's is a bad row (on_bad_rows). `expected` only words the
    error for a file with no header.
    """
    path = kind.path
    reader = csv.reader(read_lines(kind, setting), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise SourceError(f"{path}: row 1 (the header): {_csv_problem(exc, reader.line_num)}") from None
    if not header or not any(h.strip() for h in header):
        raise SourceError(f"{path}: the file holds no header row (it is empty or blank); expected a CSV with columns "
                          f"{expected}; check {setting}")
    header = [h.strip().lstrip("\ufeff") for h in header]

    def rows() -> Iterator[tuple[str, dict | None]]:
        number = 1  # spreadsheet row of the header
        while True:
            first_line = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise SourceError(f"{path}: row {number + 1} (from line {first_line}): {_csv_problem(exc, reader.line_num)}") from None
            number += 1
            where = f"{path}: row {number}" + (f" (line {first_line})" if first_line != number else "")
            if row and len(row) != len(header):
                bad_row(where, f"has {len(row)} field(s) but the header (row 1) has {len(header)} (a comma in a field that is not "
                               f"quoted, or a missing field?); quote a field that holds commas (\"...\")", on_bad_rows, drops, "simpsons")
                yield where, None
                continue
            yield where, dict(zip(header, row))
        if number == 1:
            raise SourceError(f"{path}: the CSV holds a header row but no data rows; there are no lines to read: check {setting}")

    return header, rows()


def _parquet_table(path: Path, columns: list[str]) -> Iterator[tuple[str, dict]]:
    """(where, row) of a Parquet file: only `columns`, which the caller has checked it has."""
    for number, row in _parquet_rows(path, tuple(columns), tuple(columns), ""):
        yield f"{path}: row {number}", row


# -- plain text: one row per non-blank line

TEXT_COLUMN = "text"  # the one column of a row of a .txt file (what a template names)


def _is_txt(path: Path) -> bool:
    return _plain_name(path).suffix.lower() == ".txt"


def _text_files(folder: Path, cfg: SimpsonsConfig, setting: str) -> list[FileKind]:
    """The .txt files of a folder, in path order; a folder with anything else is refused, naming it."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    names = [str(f.relative_to(folder)) for f in files]
    texts = [f for f in files if _is_txt(f)]
    if not texts:
        raise SourceError(f"{folder}: the folder holds no {cfg.file_name} (simpsons.file_name) and no .txt files (found {names[:10]}"
                          f"{' ...' if len(names) > 10 else ''}); set {setting} to a CSV, Parquet or .txt file, or to a folder of .txt files")
    others = [n for f, n in zip(files, names) if not _is_txt(f)]
    if others:
        raise SourceError(f"{folder}: {len(others)} of {len(files)} files are not .txt files, so the folder would not be read whole: "
                          f"{others[:10]}{' ...' if len(others) > 10 else ''}; move them out of the folder, or set {setting} to one file")
    kinds = []
    for f in texts:
        if f.stat().st_size == 0:
            continue  # no lines
        kind = sniff(f)
        if kind.content != "text":
            raise SourceError(kind.refusal(setting) if kind.content == "unreadable" else f"{f}: named .txt but it is {kind.label}; "
                              f"move it out of the folder")
        kinds.append(kind)
    return kinds


def _text_rows(kinds: list[FileKind], setting: str) -> Iterator[tuple[str, dict]]:
    """(where, {"text": line}) for every non-blank line of the files, in order."""
    for kind in kinds:
        for number, line in enumerate(read_lines(kind, setting), start=1):
            if line.strip():
                yield f"{kind.path}: line {number}", {TEXT_COLUMN: line.rstrip("\r\n")}


# -- which columns make a line


def template_fields(template: str) -> list[str]:
    """The column names a str.format template uses, each once, in order of use.

    Raises ValueError (naming simpsons.template) for a template that does not parse, names no
    column, or uses a positional field (`{}`, `{0}`), an attribute or an index (`{a.b}`, `{a[0]}`).
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"simpsons.template {template!r} is not a str.format template ({exc}); "
                         f"name columns in braces, e.g. \"{{minute}}' {{text}}\", and double a literal brace ({{{{ or }}}})") from None
    fields: list[str] = []
    for _, name, spec, _ in parsed:
        if name is None:
            continue
        if not name or name.isdigit() or any(c in name for c in ".["):
            raise ValueError(f"simpsons.template {template!r}: the field {{{name}}} is not a column name; "
                             f"write each field as {{column}}, e.g. {{text}} (no positions, attributes or indexes)")
        fields += [f for f in [name, *(template_fields(spec) if spec and "{" in spec else [])] if f not in fields]
    if not fields:
        raise ValueError(f"simpsons.template {template!r} names no column, so every line would be the same; "
                         f"name columns in braces, e.g. {{text}}")
    return fields


@dataclass(frozen=True)
class LinePlan:
    """What makes a line of a table: its text (a column or a template over columns) and an optional filter column."""

    text_column: str | None  # the column that is the text; None when a template makes it
    template: str  # "" unless a template makes the text
    fields: tuple[str, ...]  # the columns the text is made of
    filter_column: str | None  # keep the rows whose value here is the character; None: every row

    @property
    def columns(self) -> list[str]:
        """The columns to read, each once."""
        return list(dict.fromkeys((*self.fields, *([self.filter_column] if self.filter_column else []))))


def line_plan(cfg: SimpsonsConfig, plain_text: bool) -> LinePlan:
    """The plan for a config: a .txt source (plain_text) has one column, `text`, and no filter."""
    fields = tuple(template_fields(cfg.template)) if cfg.template else (TEXT_COLUMN if plain_text else cfg.text_column,)
    return LinePlan(None if cfg.template else fields[0], cfg.template, fields,
                    None if plain_text or not cfg.character_column else cfg.character_column)


def check_columns(path: Path, what: str, columns: list[str], plan: LinePlan, setting: str) -> None:
    """Raise, before any row is read, naming every column the plan needs that the table lacks, its columns and the field to set."""
    def guess(name: str) -> str:
        close = difflib.get_close_matches(name, columns, n=1, cutoff=0.5)
        return f" (did you mean {close[0]!r}?)" if close else ""

    problems = []
    if plan.template:
        unknown = [f for f in plan.fields if f not in columns]
        if unknown:
            problems.append(f"simpsons.template {plan.template!r} names {', '.join(f'{{{f}}}{guess(f)}' for f in unknown)}, "
                            f"which {'is not a column' if len(unknown) == 1 else 'are not columns'}: use the file's column names")
    elif plan.text_column not in columns:
        problems.append(f"no text column {plan.text_column!r}{guess(plan.text_column)}: set simpsons.text_column to the column "
                        f"that holds the lines (or simpsons.template to make them from several columns)")
    if plan.filter_column and plan.filter_column not in columns:
        problems.append(f"no column {plan.filter_column!r}{guess(plan.filter_column)} to filter on: set simpsons.character_column "
                        f"to the column whose value must be simpsons.character, or to '' to keep every row")
    if problems:
        raise SourceError(f"{path}: {'; '.join(problems)}. The {what} has columns {columns} (expected {plan.columns}); check {setting}")


def _open_table(path: Path, cfg: SimpsonsConfig, setting: str, drops: Counter) -> tuple[LinePlan, dict[str, str], Iterator]:
    """(plan, column labels for messages, rows) of a lines source, its columns checked before any row is read."""
    if path.is_dir():
        kinds = _text_files(path, cfg, setting)
        plan = line_plan(cfg, plain_text=True)
        check_columns(path, "folder of .txt files (one row per line)", [TEXT_COLUMN], plan, setting)
        return plan, {TEXT_COLUMN: TEXT_COLUMN}, _text_rows(kinds, setting)
    check_file(path, "file (CSV, Parquet or .txt)", setting)
    kind = sniff(path)
    if kind.content == "parquet":
        _, columns = _parquet_file(path)
        plan = line_plan(cfg, plain_text=False)
        check_columns(path, "Parquet file", columns, plan, setting)
        return plan, {c: c for c in columns}, _parquet_table(path, plan.columns)
    if kind.content != "text":
        raise SourceError(kind.refusal(setting) + " (a CSV, Parquet or .txt file)")
    if _is_txt(path):
        plan = line_plan(cfg, plain_text=True)
        check_columns(path, ".txt file (one row per line)", [TEXT_COLUMN], plan, setting)
        return plan, {TEXT_COLUMN: TEXT_COLUMN}, _text_rows([kind], setting)
    plan = line_plan(cfg, plain_text=False)
    header, rows = _csv_table(kind, setting, cfg.on_bad_rows, drops, plan.columns)
    check_columns(path, "CSV", header, plan, setting)
    return plan, {c: f"{c} ({column_letter(i)})" for i, c in enumerate(header)}, rows


# -- reading lines

SIMPSONS_COUNTS = ("rows_read", "kept", "dropped_blank", "dropped_other_character", "dropped_no_words",
                   "skipped_bad_rows", "dropped_control_chars", "encoding_repairs")
SCALARS = (str, int, float, bool)  # what a filter column or a template field may hold (a number formats as the template says)


def _row_values(row: dict, plan: LinePlan, where: str, on_bad_rows: str, drops: Counter) -> dict | None:
    """The plan's columns of a row ("" for a missing value); None for a value of the wrong type (a bad row, skipped)."""
    values = {}
    for column in plan.columns:
        value = row.get(column)
        allowed = str if column == plan.text_column else SCALARS
        if value is not None and not isinstance(value, allowed):
            bad_row(where, wrong_type(column, value), on_bad_rows, drops, "simpsons")
            return None
        values[column] = "" if value is None else value
    return values


def _is_blank(value: Any) -> bool:
    return isinstance(value, str) and not value.strip()


def read_simpsons(path: Path, cfg: SimpsonsConfig, setting: str = "simpsons.path") -> tuple[list[dict], dict]:
    """Keep the lines a config selects, in file order; count every other row.

    `path` (from download_simpsons) is a CSV (UTF-8 with or without a BOM, UTF-16/32 with a
    BOM; gzip, bz2, xz or, with the `zstandard` module, zstd-compressed) or a Parquet file,
    told from its bytes, or a .txt file or a folder of .txt files (one row per non-blank line,
    no filter). A line is the text column, or the template over the columns; with a filter
    column only the rows whose value is cfg.character are kept. Each kept line is repaired
    (mojibake), checked for control characters and whitespace-normalised. Returns (lines,
    counts); each line is {"row": row number (1 = the first row read: after a CSV's header, the
    first non-blank line of text), "text": the line}.
    """
    path = Path(path)
    drops = Counter()
    plan, labels, rows = _open_table(path, cfg, setting, drops)
    counts, speakers, kept = Counter(), Counter(), []
    for where, row in rows:
        counts["rows_read"] += 1
        if row is None:  # a bad row, skipped (on_bad_rows=skip)
            continue
        values = _row_values(row, plan, where, cfg.on_bad_rows, drops)
        if values is None:
            continue
        empty = all(_is_blank(values[f]) for f in plan.fields)
        if plan.filter_column:
            who = values[plan.filter_column]
            who = control_chars(who.strip(), where, labels[plan.filter_column], cfg.control_chars, drops, "simpsons") if isinstance(who, str) else str(who)
            if not who and empty:
                counts["dropped_blank"] += 1
                continue
            if who != cfg.character:
                counts["dropped_other_character"] += 1
                speakers[who] += 1
                continue
            if empty:
                counts["dropped_no_words"] += 1
                continue
        elif empty:
            counts["dropped_blank"] += 1
            continue
        parts, repaired = {}, False
        for field in plan.fields:
            value = values[field]
            if isinstance(value, str):
                value, fixed = repair_line(value)
                value = control_chars(value, where, labels[field], cfg.control_chars, drops, "simpsons")
                repaired |= fixed
            parts[field] = value
        if plan.template:
            try:
                text = plan.template.format_map(parts)
            except (ValueError, TypeError) as exc:
                bad_row(where, f"simpsons.template {plan.template!r} cannot format it ({exc}; a CSV value is text, so a "
                               f"numeric format such as {{minute:02d}} needs a Parquet file)", cfg.on_bad_rows, drops, "simpsons")
                continue
        else:
            text = parts[plan.text_column]
        counts["encoding_repairs"] += repaired
        text = " ".join(text.split())
        if text:
            kept.append({"row": counts["rows_read"], "text": text})
        else:
            counts["dropped_no_words"] += 1
    counts["skipped_bad_rows"] = drops["bad_rows"]
    counts["dropped_control_chars"] = drops["control_chars"]
    counts["kept"] = len(kept)
    if not counts["rows_read"]:
        raise SourceError(f"{path}: the file holds no rows; there are no lines to read: check {setting}")
    if not kept:
        raise _nothing_kept(path, cfg, plan, counts, speakers)
    return kept, {k: counts[k] for k in SIMPSONS_COUNTS}


def _nothing_kept(path: Path, cfg: SimpsonsConfig, plan: LinePlan, counts: Counter, speakers: Counter) -> SourceError:
    """The error for a source that gave no line: how many rows were read, what dropped them, and for a filter its common values."""
    read = counts["rows_read"]
    if counts["skipped_bad_rows"] == read:
        return SourceError(f"{path}: all {read} rows were skipped as bad rows (simpsons.on_bad_rows=skip); "
                           f"set simpsons.on_bad_rows=error to see the first one")
    dropped = ", ".join(f"{counts[k]} {k}" for k in SIMPSONS_COUNTS if k.startswith(("dropped_", "skipped_")) and counts[k])
    if not plan.filter_column:
        made = f"simpsons.template {plan.template!r}" if plan.template else f"the text column {plan.text_column!r}"
        return SourceError(f"{path}: no line with words among {read} rows read (no filter; {dropped}): {made} is blank in "
                           f"every row; check simpsons.text_column or simpsons.template")
    close = difflib.get_close_matches(cfg.character, list(speakers), n=3, cutoff=0.5)
    common = [name for name, _ in speakers.most_common(5)]
    return SourceError(
        f"{path}: no rows with words for simpsons.character={cfg.character!r} among {read} rows read "
        f"(filter: column {plan.filter_column!r} equal to it; {dropped})"
        + (f"; did you mean {close[0]!r}?" if close else "")
        + f" close matches: {close or 'none'}; most common values of {plan.filter_column!r}: {common}. "
        f"Check simpsons.character (or simpsons.character_column; '' keeps every row)"
    )


def read_simpsons_csv(path: Path, character: str, setting: str = "simpsons.path", control_chars_mode: str = "error",
                      on_bad_rows: str = "error") -> tuple[list[dict], dict]:
    """read_simpsons with the Kaggle file's columns (raw_character_text, spoken_words), keeping `character`'s lines."""
    cfg = SimpsonsConfig(character=character, control_chars=control_chars_mode, on_bad_rows=on_bad_rows)
    return read_simpsons(path, cfg, setting)
