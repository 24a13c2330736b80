"""Readers of the two sources: the Simpsons CSV quirks and the local Wikipedia formats."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.data.sources import (
    SAMPLE_SIMPSONS,
    SAMPLE_WIKIPEDIA,
    SimpsonsConfig,
    SourceError,
    WikipediaConfig,
    check_utf8,
    normalise_line,
    read_simpsons_csv,
    read_wikipedia,
)


def test_csv_quirks_keep_only_the_characters_lines_with_words(small_csv):
    lines, counts = read_simpsons_csv(small_csv, "Homer Simpson")
    assert [x["text"] for x in lines] == [
        'Marge, I said "no more" and I meant it.',
        "Mmm... doughnuts.",
        "I’m not fat … I'm big-boned.",
    ]
    assert [x["row"] for x in lines] == [2, 6, 8]
    assert counts == {"rows_read": 8, "kept": 3, "dropped_blank": 1, "dropped_other_character": 3,
                      "dropped_no_words": 1, "skipped_bad_rows": 0, "dropped_control_chars": 0, "encoding_repairs": 1}


def test_normalise_line_repairs_mojibake_and_whitespace():
    assert normalise_line("  Woo-hoo!â€¦\t now ") == ("Woo-hoo!… now", True)
    assert normalise_line("D'oh!") == ("D'oh!", False)
    assert normalise_line("I call it â€œFrothyâ€.") == ("I call it “Frothy”.", True)


def test_csv_missing_columns_lists_found_and_expected(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("character,line\nHomer Simpson,D'oh!\n", encoding="utf-8")
    with pytest.raises(SourceError) as err:
        read_simpsons_csv(path, "Homer Simpson")
    message = str(err.value)
    assert str(path) in message and "['character', 'line']" in message and "spoken_words" in message


def test_csv_with_no_rows_for_the_character(small_csv):
    with pytest.raises(SourceError, match="Ned Flanders"):
        read_simpsons_csv(small_csv, "Ned Flanders")


@pytest.mark.parametrize("content", [None, b""])
def test_missing_or_empty_csv(tmp_path, content):
    path = tmp_path / "simpsons_dataset.csv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SourceError, match="simpsons.path"):
        read_simpsons_csv(path, "Homer Simpson")


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("raw_character_text,spoken_words\nHomer Simpson,ok\nHomer Simpson,caf\xe9\n".encode("latin-1"))
    with pytest.raises(SourceError, match=r"line 3 .*not valid UTF-8"):
        check_utf8(path)
    with pytest.raises(SourceError, match="line 3"):
        read_simpsons_csv(path, "Homer Simpson")


def test_bundled_sample_csv_has_the_real_quirks():
    raw = SAMPLE_SIMPSONS.read_text(encoding="utf-8")
    assert "\n,\n" in raw and '""' in raw and "â€" in raw
    lines, counts = read_simpsons_csv(SAMPLE_SIMPSONS, "Homer Simpson")
    assert counts["rows_read"] >= 1000 and counts["kept"] > 300
    assert counts["dropped_blank"] > 0 and counts["dropped_no_words"] > 0 and counts["encoding_repairs"] > 0
    assert not any("â€" in x["text"] or "  " in x["text"] for x in lines)


def _articles(n=3):
    return [{"id": str(i), "url": f"https://example.org/{i}", "title": f"T{i}", "text": f"Article {i} body."} for i in range(n)]


def test_local_jsonl_parquet_and_txt_folder(tmp_path):
    rows = _articles()
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    parquet_dir = tmp_path / "pq"
    parquet_dir.mkdir()
    pq.write_table(pa.Table.from_pylist([{"text": r["text"]} for r in rows]), parquet_dir / "part-0.parquet")
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for r in rows:
        (txt_dir / f"Title_{r['id']}.txt").write_text(r["text"], encoding="utf-8")

    assert list(read_wikipedia(WikipediaConfig(source="local", path=str(jsonl)))) == rows
    from_parquet = list(read_wikipedia(WikipediaConfig(source="local", path=str(parquet_dir), max_articles=2)))
    assert [a["text"] for a in from_parquet] == [r["text"] for r in rows[:2]] and from_parquet[1]["id"] == "1"
    from_txt = list(read_wikipedia(WikipediaConfig(source="local", path=str(txt_dir))))
    assert [(a["title"], a["text"]) for a in from_txt] == [(f"Title {r['id']}", r["text"]) for r in rows]


def test_article_with_no_text_is_dropped_and_counted(tmp_path):
    from collections import Counter

    rows = _articles()
    rows[1]["text"] = "   "
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    drops = Counter()
    got = list(read_wikipedia(WikipediaConfig(source="local", path=str(path)), drops))
    assert [a["id"] for a in got] == ["0", "2"] and drops["empty_text"] == 1


def test_local_file_without_text_column(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist([{"body": "x"}]), path)
    with pytest.raises(SourceError, match="text"):
        list(read_wikipedia(WikipediaConfig(source="local", path=str(path))))


def test_local_missing_path_and_non_utf8(tmp_path):
    with pytest.raises(SourceError, match="wikipedia.path"):
        list(read_wikipedia(WikipediaConfig(source="local", path=str(tmp_path / "nope.jsonl"))))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(SourceError, match="not valid UTF-8"):
        list(read_wikipedia(WikipediaConfig(source="local", path=str(bad))))


def test_sample_articles_are_large_enough():
    articles = list(read_wikipedia(WikipediaConfig(source="sample")))
    assert len(articles) >= 40 and sum(len(a["text"]) for a in articles) >= 100_000
    assert SAMPLE_WIKIPEDIA.is_file()


def test_config_requires_path_for_local():
    with pytest.raises(ValueError, match="wikipedia.path"):
        WikipediaConfig(source="local")
    with pytest.raises(ValueError, match="simpsons.path"):
        SimpsonsConfig(source="local")


def test_a_stream_that_breaks_is_retried_without_repeating_articles(monkeypatch):
    import model.data.sources as sources

    rows = [{"id": str(i), "text": f"article {i}"} for i in range(6)]
    calls = []

    def flaky_stream(cfg):
        calls.append(1)
        def rows_until_failure():
            for i, row in enumerate(rows):
                if len(calls) == 1 and i == 3:
                    raise ConnectionError("connection reset by peer")
                yield row
        return rows_until_failure(), None

    monkeypatch.setattr(sources, "_open_stream", flaky_stream)
    got = [a["id"] for a in read_wikipedia(WikipediaConfig(source="hub", retries=2, backoff_s=0))]
    assert got == ["0", "1", "2", "3", "4", "5"] and len(calls) == 2


def test_source_stamp_follows_the_file_content(tmp_path):
    from model.data.sources import source_stamp

    path = tmp_path / "s.csv"
    path.write_text("raw_character_text,spoken_words\nHomer Simpson,D'oh!\n", encoding="utf-8")
    cfg = SimpsonsConfig(source="local", path=str(path))
    first = source_stamp(cfg)
    assert first == source_stamp(cfg)
    path.write_text("raw_character_text,spoken_words\nHomer Simpson,Woo-hoo!\n", encoding="utf-8")
    assert source_stamp(cfg) != first
    assert source_stamp(SimpsonsConfig()) is None  # kaggle: the handle in the config names it


def test_no_rows_for_the_character_suggests_close_names(small_csv):
    with pytest.raises(SourceError, match=r"close matches: \['Homer Simpson'"):
        read_simpsons_csv(small_csv, "Homer Simpsons")


def test_sample_files_are_package_data_listed_in_pyproject():
    """The sample profile's files live in the `model` package and pyproject ships each one."""
    import tomllib
    from pathlib import Path

    import model
    from model.data.sources import SAMPLE_FILES, files_stamp, sample_file, source_stamp

    package = Path(model.__file__).resolve().parent
    for source in SAMPLE_FILES:
        assert sample_file(source).is_file() and sample_file(source).resolve().is_relative_to(package / "sample_data")
    assert (SAMPLE_WIKIPEDIA, SAMPLE_SIMPSONS) == (sample_file("wikipedia"), sample_file("simpsons"))
    pyproject = tomllib.loads((package.parent / "pyproject.toml").read_text(encoding="utf-8"))
    listed = pyproject["tool"]["setuptools"]["package-data"]["model"]
    on_disk = [p.relative_to(package).as_posix() for p in (package / "sample_data").rglob("*") if p.is_file()]
    assert sorted(listed) == sorted(on_disk)  # a file added to sample_data/ must be listed, or wheels lack it
    # the ingest fingerprint hashes the bundled file's content
    assert source_stamp(WikipediaConfig(source="sample")) == files_stamp(sample_file("wikipedia"))
    assert source_stamp(SimpsonsConfig(source="sample")) == files_stamp(sample_file("simpsons"))
