"""Any corpus, for either stage: a hub data set with another text column, and fine-tuning lines from
.txt files, CSV or Parquet with other column names, or a template over an events table; and the
errors that name what was found and what to set.

Every case writes its own small input under tmp_path. `--set` values go through the CLI's parser
(model.training.overrides.apply_sets), so a test reads what `homer ... --set` would.
"""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from model.data.sources import (SimpsonsConfig, SourceError, WikipediaConfig, download_simpsons, read_simpsons, read_wikipedia,
                                template_fields)
from model.training.overrides import apply_sets

EVENTS = ("minute,event_type,text\n"
          "1,kick-off,Springfield kick off.\n"
          "23,goal,\"Homer scores, the crowd goes wild.\"\n"
          "45,,\n"
          "90,full time,Springfield 1-0 Shelbyville.\n")


def simpsons(*sets: str) -> SimpsonsConfig:
    """The simpsons config that `homer ... --set simpsons.KEY=VALUE ...` makes."""
    data: dict = {}
    assert apply_sets(data, [f"simpsons.{s}" for s in sets]) == []
    return SimpsonsConfig.model_validate(data["simpsons"])


def read(*sets: str):
    cfg = simpsons("source=local", *sets)
    return read_simpsons(download_simpsons(cfg), cfg)


# ---------------------------------------------------------------------------- fine-tuning: what is read


def test_a_txt_file_is_one_row_per_non_blank_line_with_no_filter(tmp_path):
    path = tmp_path / "homer.txt"
    path.write_text("D'oh!\n\n   \nMmm...   doughnuts.\r\nWoo-hoo!", encoding="utf-8")
    lines, counts = read(f"path={path}")  # the default filter (raw_character_text) does not apply to text
    assert lines == [{"row": 1, "text": "D'oh!"}, {"row": 2, "text": "Mmm... doughnuts."}, {"row": 3, "text": "Woo-hoo!"}]
    assert counts["rows_read"] == 3 and counts["kept"] == 3 and counts["dropped_other_character"] == 0


def test_a_folder_of_txt_files_is_read_in_path_order_and_anything_else_refused(tmp_path):
    folder = tmp_path / "lines"
    folder.mkdir()
    (folder / "b.txt").write_text("second file\n", encoding="utf-8")
    (folder / "a.txt").write_text("first\nfile\n", encoding="utf-8")
    lines, _ = read(f"path={folder}", "template='> {text}'")  # a .txt row has one column: text
    assert [x["text"] for x in lines] == ["> first", "> file", "> second file"]
    (folder / "notes.md").write_text("# not lines\n", encoding="utf-8")
    with pytest.raises(SourceError, match=re.escape(f"{folder}: 1 of 3 files are not .txt files") + ".*notes.md"):
        read(f"path={folder}")


def test_a_dialogue_csv_with_other_column_names(tmp_path):
    path = tmp_path / "dialogue.csv"
    path.write_text("episode,speaker,dialogue\n1,Marge,Homer!\n1,Homer,D'oh!\n2,Homer,\n2,Homer,Woo-hoo!\n", encoding="utf-8")
    lines, counts = read(f"path={path}", "text_column=dialogue", "character_column=speaker", "character=Homer")
    assert [x["text"] for x in lines] == ["D'oh!", "Woo-hoo!"] and [x["row"] for x in lines] == [2, 4]
    assert (counts["dropped_other_character"], counts["dropped_no_words"]) == (1, 1)
    everyone, _ = read(f"path={path}", "text_column=dialogue", "character_column=")  # `--set key=`: no filter
    assert [x["text"] for x in everyone] == ["Homer!", "D'oh!", "Woo-hoo!"]


def test_a_parquet_file_with_other_column_names_and_types(tmp_path):
    path = tmp_path / "lines.parquet"
    pq.write_table(pa.table({"who": ["Bart", "Lisa", None, "Lisa"], "line": ["Eay caramba!", "If anyone wants me...", "x", None],
                             "n": [1, 2, 3, 4]}), path)
    lines, counts = read(f"path={path}", "text_column=line", "character_column=who", "character=Lisa")
    assert lines == [{"row": 2, "text": "If anyone wants me..."}] and counts["dropped_no_words"] == 1
    numbered, _ = read(f"path={path}", "character_column=", "template='{n:02d}. {line}'")  # numbers keep their type
    assert [x["text"] for x in numbered] == ["01. Eay caramba!", "02. If anyone wants me...", "03. x", "04."]


def test_a_template_over_an_events_table(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text(EVENTS, encoding="utf-8")
    lines, counts = read(f"path={path}", "character_column=", "template={minute}' {event_type}: {text}")
    assert [x["text"] for x in lines] == ["1' kick-off: Springfield kick off.", "23' goal: Homer scores, the crowd goes wild.",
                                          "45' :", "90' full time: Springfield 1-0 Shelbyville."]
    goals, counts = read(f"path={path}", "character_column=event_type", "character=goal", "template='{minute}: {text}'")
    assert [x["text"] for x in goals] == ["23: Homer scores, the crowd goes wild."] and counts["dropped_other_character"] == 3
    assert template_fields("{a} {b:>{width}} {a!r}") == ["a", "b", "width"]


# ---------------------------------------------------------------------------- fine-tuning: errors


def test_a_missing_text_column_names_the_columns_the_field_and_a_close_one(tmp_path):
    path = tmp_path / "dialogue.csv"  # row 3 is broken: the columns are checked before any row is read
    path.write_text('speaker,dialog\nHomer,"unterminated\n', encoding="utf-8")
    with pytest.raises(SourceError) as err:
        read(f"path={path}", "text_column=dialogue", "character_column=speaker")
    message = str(err.value)
    assert message.startswith(f"{path}: no text column 'dialogue' (did you mean 'dialog'?)")
    assert "simpsons.text_column" in message and "['speaker', 'dialog']" in message and "unterminated" not in message


def test_a_missing_filter_column_says_how_to_keep_every_row(tmp_path):
    path = tmp_path / "lines.parquet"
    pq.write_table(pa.table({"line": ["a"]}), path)
    with pytest.raises(SourceError) as err:
        read(f"path={path}", "text_column=line")
    message = str(err.value)
    assert message.startswith(f"{path}: no column 'raw_character_text'") and "simpsons.character_column" in message
    assert "'' to keep every row" in message and "Parquet file has columns ['line']" in message


def test_an_unknown_template_field_is_named_before_any_row_is_read(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text(EVENTS + '91,"broken\n', encoding="utf-8")
    with pytest.raises(SourceError) as err:
        read(f"path={path}", "character_column=", "template={minute}' {type}: {txt}")
    message = str(err.value)
    assert "names {type} (did you mean 'event_type'?), {txt} (did you mean 'text'?), which are not columns" in message
    assert "['minute', 'event_type', 'text']" in message and "broken" not in message
    with pytest.raises(ValidationError, match="not a column name"):
        simpsons("template='{0} {text}'")
    with pytest.raises(ValidationError, match="quote it"):
        simpsons("template={text}")  # YAML reads an unquoted {text} as a mapping


def test_a_numeric_format_on_csv_text_names_the_row(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text(EVENTS, encoding="utf-8")
    with pytest.raises(SourceError, match=re.escape(f"{path}: row 2: simpsons.template '{{minute:02d}} {{text}}' cannot format it")):
        read(f"path={path}", "character_column=", "template='{minute:02d} {text}'")


def test_an_empty_result_says_rows_read_the_filter_and_common_values(tmp_path):
    path = tmp_path / "dialogue.csv"
    path.write_text("speaker,dialogue\n" + "Homer Simpson,D'oh!\n" * 3 + "Marge Simpson,Hmm.\n", encoding="utf-8")
    with pytest.raises(SourceError) as err:
        read(f"path={path}", "text_column=dialogue", "character_column=speaker", "character=Homer")
    message = str(err.value)
    assert "among 4 rows read (filter: column 'speaker'" in message and "4 dropped_other_character" in message
    assert "did you mean 'Homer Simpson'?" in message and "['Homer Simpson', 'Marge Simpson']" in message
    blank = tmp_path / "blank.csv"
    blank.write_text("dialogue\n\"  \"\n\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"no line with words among 2 rows read \(no filter; 2 dropped_blank\)"):
        read(f"path={blank}", "text_column=dialogue", "character_column=")


# ---------------------------------------------------------------------------- pretraining: any column of a hub data set


def test_hub_data_set_with_another_text_column_and_no_config(tmp_path):
    folder = tmp_path / "hub" / "essays"  # a hub-format folder with no README configs: the default config
    (folder / "data").mkdir(parents=True)
    rows = [{"title": f"E{i}", "body": f"Essay {i} about Springfield.", "text": "not this", "score": i} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), folder / "data" / "train-00000-of-00001.parquet")
    cfg = WikipediaConfig(source="hub", dataset=str(folder), config_name="", text_column="body", max_articles=4)
    articles = list(read_wikipedia(cfg))
    assert [(a["id"], a["title"], a["text"]) for a in articles] == [(str(i), f"E{i}", f"Essay {i} about Springfield.") for i in range(4)]
    with pytest.raises(SourceError) as err:
        list(read_wikipedia(cfg.model_copy(update={"text_column": "bodies"})))
    message = str(err.value)
    assert "no `bodies` column" in message and "'score'" in message and "wikipedia.text_column" in message and "'body'?" in message


def test_local_parquet_with_another_text_column(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist([{"content": "One."}, {"content": "Two."}]), path)
    got = list(read_wikipedia(WikipediaConfig(source="local", path=str(path), text_column="content")))
    assert [a["text"] for a in got] == ["One.", "Two."]
    with pytest.raises(SourceError, match="set wikipedia.text_column"):
        list(read_wikipedia(WikipediaConfig(source="local", path=str(path))))
