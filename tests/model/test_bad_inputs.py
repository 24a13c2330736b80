"""Inputs: read what is readable (any BOM'd Unicode, compressed), refuse the rest naming file, row and fix.

Every case writes its own small file: an encoding, a compression, a control character, a
broken CSV row, a value of the wrong type, a mixed folder, an empty input; and the config's
numeric bounds.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
import shlex
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.data.sources import (
    SAMPLE_SIMPSONS,
    SourceError,
    WikipediaConfig,
    read_simpsons_csv,
    read_wikipedia,
)
from tests.conftest import SMALL_CSV

HOMER_LINES = ['Marge, I said "no more" and I meant it.', "Mmm... doughnuts.", "I’m not fat … I'm big-boned."]
HEADER = "raw_character_text,spoken_words\n"

try:
    import zstandard  # noqa: F401

    HAS_ZSTANDARD = True
except ImportError:
    HAS_ZSTANDARD = False


def _zstd(data: bytes) -> bytes:
    return pa.compress(data, codec="zstd", asbytes=True)  # a zstd frame, made without the zstandard module


ENCODED = {
    "utf-8-bom": lambda t: t.encode("utf-8-sig"),
    "utf-16-le-bom": lambda t: t.encode("utf-16"),  # BOM + little-endian
    "utf-16-be-bom": lambda t: b"\xfe\xff" + t.encode("utf-16-be"),
    "utf-32-bom": lambda t: t.encode("utf-32"),
    "gzip": lambda t: gzip.compress(t.encode()),
    "bz2": lambda t: bz2.compress(t.encode()),
    "xz": lambda t: lzma.compress(t.encode()),
    "gzip-of-utf-16": lambda t: gzip.compress(t.encode("utf-16")),
    "crlf-utf-16": lambda t: t.replace("\n", "\r\n").encode("utf-16"),  # a spreadsheet's "Unicode text" export
}


@pytest.mark.parametrize("kind", sorted(ENCODED))
def test_csv_in_any_bom_encoding_or_compression_reads_the_same(tmp_path, kind):
    path = tmp_path / "simpsons_dataset.csv"  # the name says nothing: the bytes do
    path.write_bytes(ENCODED[kind](SMALL_CSV))
    lines, counts = read_simpsons_csv(path, "Homer Simpson")
    assert [x["text"] for x in lines] == HOMER_LINES and [x["row"] for x in lines] == [2, 6, 8]
    assert counts["rows_read"] == 8 and counts["encoding_repairs"] == 1


def test_zstd_is_read_with_zstandard_or_refused_saying_how_to_decompress(tmp_path):
    path = tmp_path / "simpsons_dataset.csv.zst"
    path.write_bytes(_zstd(SMALL_CSV.encode()))
    if HAS_ZSTANDARD:
        lines, _ = read_simpsons_csv(path, "Homer Simpson")
        assert [x["text"] for x in lines] == HOMER_LINES
        return
    with pytest.raises(SourceError) as err:
        read_simpsons_csv(path, "Homer Simpson")
    message = str(err.value)
    assert message.startswith(f"{path}: the file is zstd-compressed") and "zstandard" in message
    assert f"zstd -dc {path} > {tmp_path / 'simpsons_dataset.csv'}" in message and "simpsons.path" in message


def test_utf16_without_bom_is_named_with_a_conversion_that_works(tmp_path):
    path = tmp_path / "lines.csv"
    path.write_bytes(SMALL_CSV.encode("utf-16-le"))
    with pytest.raises(SourceError) as err:
        read_simpsons_csv(path, "Homer Simpson")
    message = str(err.value)
    assert "UTF-16LE text without a byte-order mark" in message and "iconv -f UTF-16LE -t UTF-8" in message
    assert "not valid UTF-8" not in message and "latin1" not in message


def _follow_iconv(message: str) -> Path:
    """Do what the message's `iconv -f ENC -t UTF-8 IN > OUT` says, in Python; return OUT."""
    command = re.search(r"`iconv -f (\S+) -t UTF-8 (.+?) > (.+?)`", message)
    assert command, message
    encoding, source, out = command.group(1), *shlex.split(command.group(2) + " " + command.group(3))
    Path(out).write_text(Path(source).read_bytes().decode(encoding), encoding="utf-8")
    return Path(out)


def test_real_non_utf8_text_names_line_byte_and_its_encoding(tmp_path):
    path = tmp_path / "lines.csv"
    path.write_bytes((HEADER + "Homer Simpson,ok\nHomer Simpson,Un caf\xe9 cr\xe8me s'il vous pla\xeet.\n").encode("cp1252"))
    with pytest.raises(SourceError) as err:
        read_simpsons_csv(path, "Homer Simpson")
    message = str(err.value)
    assert message.startswith(f"{path}: line 3 (byte 69) is not valid UTF-8")
    assert "Windows-1252" in message and "latin1" not in message
    converted = _follow_iconv(message)  # the fix the message gives works
    assert f"simpsons.path={converted}" in message
    lines, _ = read_simpsons_csv(converted, "Homer Simpson")
    assert lines[1]["text"] == "Un café crème s'il vous plaît."


def test_cyrillic_text_gets_its_own_encoding(tmp_path):
    path = tmp_path / "articles.jsonl"
    path.write_bytes(json.dumps({"text": "Привет, Спрингфилд"}, ensure_ascii=False).encode("cp1251") + b"\n")
    with pytest.raises(SourceError, match=r"line 1 \(byte 10\) is not valid UTF-8.*Windows-1251.*iconv -f CP1251 -t UTF-8"):
        list(read_wikipedia(WikipediaConfig(source="local", path=str(path))))


@pytest.mark.parametrize("payload, what", [
    (b"PK\x03\x04" + b"\0" * 40, "a zip archive"),
    (gzip.compress(b"PAR1" + b"\0" * 20, mtime=0), "a gzip-compressed Parquet file"),
])
def test_archives_are_refused_by_what_they_are(tmp_path, payload, what):
    path = tmp_path / "simpsons_dataset.csv"
    path.write_bytes(payload)
    with pytest.raises(SourceError, match=re.escape(f"{path}: the file is {what}")):
        read_simpsons_csv(path, "Homer Simpson")


def test_a_truncated_gzip_names_the_file(tmp_path):
    path = tmp_path / "simpsons_dataset.csv.gz"
    path.write_bytes(gzip.compress((SMALL_CSV * 50).encode())[:300])
    with pytest.raises(SourceError, match=re.escape(f"{path}: the file is gzip-compressed but its data is damaged or cut short")):
        read_simpsons_csv(path, "Homer Simpson")


# ---------------------------------------------------------------------------- control characters


def test_nul_in_a_line_names_file_row_and_column_or_is_dropped_and_counted(tmp_path):
    path = tmp_path / "simpsons_dataset.csv"
    path.write_text(HEADER + "Homer Simpson,D'oh!\nHomer Simpson,Mmm\x00 beer.\tCold.\n", encoding="utf-8")
    with pytest.raises(SourceError) as err:
        read_simpsons_csv(path, "Homer Simpson")
    assert str(err.value).startswith(f"{path}: row 3, column spoken_words (B): control character U+0000 (NUL) at character 4")
    assert "simpsons.control_chars=drop" in str(err.value)
    lines, counts = read_simpsons_csv(path, "Homer Simpson", control_chars_mode="drop")
    assert [x["text"] for x in lines] == ["D'oh!", "Mmm beer. Cold."]  # the tab is whitespace, not a control character
    assert counts["dropped_control_chars"] == 1


def test_control_characters_in_articles(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"title": "Bell\x07", "text": "ring\x1b[0m"}) + "\n", encoding="utf-8")
    with pytest.raises(SourceError, match=re.escape(f"{path}: line 2, column title: control character U+0007 (BEL)")):
        list(read_wikipedia(WikipediaConfig(source="local", path=str(path))))
    drops = Counter()
    got = list(read_wikipedia(WikipediaConfig(source="local", path=str(path), control_chars="drop"), drops))
    assert got[1]["title"] == "Bell" and got[1]["text"] == "ring[0m" and drops["control_chars"] == 2


# ---------------------------------------------------------------------------- strict CSV


def test_an_unterminated_quote_is_an_error_at_its_row_never_a_merged_line(tmp_path):
    path = tmp_path / "simpsons_dataset.csv"
    path.write_text(HEADER + "Homer Simpson,\"Marge, where's my\nMarge Simpson,Right here.\nBart Simpson,Eat my shorts.\n", encoding="utf-8")
    with pytest.raises(SourceError, match=re.escape(f"{path}: row 2 (from line 2): a quoted field opens in this row and is never closed")):
        read_simpsons_csv(path, "Homer Simpson", on_bad_rows="skip")  # nothing can be skipped safely
    # the quote "closes" at a later quoted field: still this row's error, not one glued line
    path.write_text(HEADER + "Bart Simpson,Hi.\nHomer Simpson,\"Marge, where's my\nMarge Simpson,\"Right here, Homer.\"\n", encoding="utf-8")
    with pytest.raises(SourceError, match=re.escape(f"{path}: row 3 (from line 3): a quote ends a quoted field but the field goes on")):
        read_simpsons_csv(path, "Homer Simpson")


def test_a_row_with_the_wrong_number_of_fields_is_named_or_skipped(tmp_path):
    path = tmp_path / "simpsons_dataset.csv"
    path.write_text(HEADER + "Homer Simpson,D'oh!\n\"Marge, Simpson\",Homer,no\nHomer Simpson,Woo-hoo!\n", encoding="utf-8")
    with pytest.raises(SourceError) as err:
        read_simpsons_csv(path, "Homer Simpson")
    assert str(err.value).startswith(f"{path}: row 3: has 3 field(s) but the header (row 1) has 2")
    assert "simpsons.on_bad_rows=skip" in str(err.value)
    lines, counts = read_simpsons_csv(path, "Homer Simpson", on_bad_rows="skip")
    assert [x["text"] for x in lines] == ["D'oh!", "Woo-hoo!"] and counts["skipped_bad_rows"] == 1 and counts["rows_read"] == 3


def test_a_header_only_csv_says_it_is_empty(tmp_path):
    path = tmp_path / "simpsons_dataset.csv"
    path.write_text(HEADER, encoding="utf-8")
    with pytest.raises(SourceError) as err:
        read_simpsons_csv(path, "Homer Simpson")
    assert str(err.value).startswith(f"{path}: the CSV holds a header row but no data rows") and "simpsons.character" not in str(err.value)


def test_the_bundled_sample_keeps_its_counts():
    _, counts = read_simpsons_csv(SAMPLE_SIMPSONS, "Homer Simpson")
    assert (counts["rows_read"], counts["kept"], counts["skipped_bad_rows"], counts["dropped_control_chars"]) == (1403, 525, 0, 0)
    articles = list(read_wikipedia(WikipediaConfig(source="sample")))
    assert len(articles) == 56 and sum(len(a["text"]) for a in articles) == 132_665


# ---------------------------------------------------------------------------- types


def test_a_number_in_spoken_words_of_a_parquet_input(tmp_path):
    path = tmp_path / "lines.parquet"
    pq.write_table(pa.table({"raw_character_text": ["Homer Simpson", "Homer Simpson"], "spoken_words": [42, 7]}), path)
    with pytest.raises(SourceError, match=re.escape(f"{path}: row 1: column spoken_words holds int 42, not text")):
        read_simpsons_csv(path, "Homer Simpson")
    with pytest.raises(SourceError, match="all 2 rows were skipped as bad rows"):
        read_simpsons_csv(path, "Homer Simpson", on_bad_rows="skip")
    pq.write_table(pa.table({"raw_character_text": ["Homer Simpson", "Bart Simpson"], "spoken_words": ["D'oh!", "Ay caramba!"]}), path)
    lines, counts = read_simpsons_csv(path, "Homer Simpson")
    assert lines == [{"row": 1, "text": "D'oh!"}] and counts["rows_read"] == 2


def test_an_int_in_text_from_json_lines_is_named_or_skipped(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"text": "one"}, {"text": 5}, {"text": "three"}]) + "\n", encoding="utf-8")
    with pytest.raises(SourceError) as err:
        list(read_wikipedia(WikipediaConfig(source="local", path=str(path))))
    assert str(err.value).startswith(f"{path}: line 2: column text holds int 5, not text") and "wikipedia.on_bad_rows=skip" in str(err.value)
    drops = Counter()
    got = list(read_wikipedia(WikipediaConfig(source="local", path=str(path), on_bad_rows="skip"), drops))
    assert [a["text"] for a in got] == ["one", "three"] and drops["bad_rows"] == 1


# ---------------------------------------------------------------------------- local Wikipedia files and folders


def test_a_folder_of_mixed_formats_and_encodings_is_read_whole(tmp_path):
    folder = tmp_path / "articles"
    folder.mkdir()
    pq.write_table(pa.table({"id": ["p1"], "text": ["From Parquet."]}), folder / "a.parquet")
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(json.dumps({"id": "j1", "text": "From gzip JSON Lines."}).encode()))
    (folder / "c_Springfield.txt").write_bytes("Springfield — a town.".encode("utf-16"))
    (folder / "d.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([{"id": "arr", "text": "From an array."}]).encode())
    got = list(read_wikipedia(WikipediaConfig(source="local", path=str(folder))))
    assert [(a["id"], a["title"], a["text"]) for a in got] == [
        ("p1", "", "From Parquet."), ("j1", "", "From gzip JSON Lines."), ("2", "c Springfield", "Springfield — a town."),
        ("arr", "", "From an array.")]


def test_a_folder_with_unreadable_files_says_which_are_left_out_and_why(tmp_path):
    folder = tmp_path / "articles"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"text": "ok"}) + "\n", encoding="utf-8")
    (folder / "README.md").write_text("# notes\n", encoding="utf-8")
    (folder / "more.zip").write_bytes(b"PK\x03\x04" + b"\0" * 40)
    (folder / "empty.txt").write_bytes(b"")
    with pytest.raises(SourceError) as err:
        list(read_wikipedia(WikipediaConfig(source="local", path=str(folder))))
    message = str(err.value)
    assert message.startswith(f"{folder}: 3 of 4 files cannot be read as articles")
    assert "README.md (text, but not named .parquet, .jsonl/.json or .txt)" in message
    assert "more.zip (a zip archive" in message and "empty.txt (empty (0 bytes))" in message


@pytest.mark.parametrize("name, content, said", [
    ("blank.jsonl", b"\n\n", "holds no JSON objects (only blank lines)"),
    ("empty.parquet", None, "the Parquet file holds no rows"),
    ("empty.json", b"[]", "the JSON array is empty"),
])
def test_empty_article_inputs_say_so(tmp_path, name, content, said):
    path = tmp_path / name
    if content is None:
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    else:
        path.write_bytes(content)
    with pytest.raises(SourceError, match=re.escape(f"{path}: {said}")):
        list(read_wikipedia(WikipediaConfig(source="local", path=str(path))))


def test_local_shuffle_buffer_is_seeded(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "text": f"article {i}"}) + "\n" for i in range(20)), encoding="utf-8")
    take = lambda seed: [a["id"] for a in read_wikipedia(WikipediaConfig(source="local", path=str(path), max_articles=10, shuffle_buffer=8, seed=seed))]
    assert take(1) == take(1) and take(1) != take(2) and take(1) != [str(i) for i in range(10)] and len(set(take(1))) == 10


# ---------------------------------------------------------------------------- numeric settings


@pytest.mark.parametrize("item, field, said", [
    ("report.temperatures=[-1]", "report.temperatures.0", "greater than 0"),
    ("report.temperatures=[]", "report.temperatures", "at least 1 item"),
    ("pretrain.train.learning_rate=.inf", "pretrain.train.learning_rate", "finite number"),
    ("finetune.train.learning_rate=.nan", "finetune.train.learning_rate", "finite number"),
    ("pretrain.train.grad_clip=.inf", "pretrain.train.grad_clip", "finite number"),
    ("pretrain.model.dropout=.nan", "pretrain.model.dropout", "finite number"),
    ("prepare.val_fraction=.nan", "prepare.val_fraction", "finite number"),
    ("wikipedia.backoff_s=.inf", "wikipedia.backoff_s", "finite number"),
    ("wikipedia.seed=-1", "wikipedia.seed", "greater than or equal to 0"),
])
def test_numeric_settings_are_bounded_when_the_config_is_read(item, field, said):
    from flows.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(sets=[item])
    assert f"- {field}: " in str(err.value) and said in str(err.value)


def test_generate_temperature_must_be_finite():
    from pydantic import ValidationError

    from flows.config import GenerateConfig

    for bad in (float("inf"), float("nan"), 0.0, -1.0):
        with pytest.raises(ValidationError, match="temperature"):
            GenerateConfig(temperature=bad)


def test_homer_config_refuses_an_infinite_learning_rate():
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["config", "--set", "pretrain.train.learning_rate=.inf"])
    assert result.exit_code == 2 and "pretrain.train.learning_rate" in result.output and "finite" in result.output
