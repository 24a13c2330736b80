"""Bad input through the real `homer` command: one `error:` line, exit code 1, no traceback (unless --verbose)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


def homer(*args: str, data_dir) -> subprocess.CompletedProcess:
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, HOMER_DATA_DIR=str(data_dir), PREFECT_API_URL=PREFECT_API_URL.value())
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, capture_output=True, text=True, timeout=180)


def _local_simpsons(path) -> list[str]:
    return ["stage", "ingest-simpsons", "--set", "simpsons.source=local", "--set", f"simpsons.path={path}"]


@pytest.mark.parametrize("kind", ["wrong columns", "missing file", "wrong format", "missing stage input", "unknown checkpoint"])
def test_bad_input_ends_in_one_error_line(kind, tmp_path, data_dir):
    wrong_columns = tmp_path / "columns.csv"
    wrong_columns.write_text("speaker,line\nHomer Simpson,D'oh!\n", encoding="utf-8")
    zipped = tmp_path / "lines.csv"  # an .xlsx workbook saved under a .csv name: a zip archive
    zipped.write_bytes(b"PK\x03\x04" + gzip.compress(b"raw_character_text,spoken_words\nHomer Simpson,D'oh!\n" * 50))
    args, names = {
        "wrong columns": (_local_simpsons(wrong_columns), "columns.csv"),
        "missing file": (_local_simpsons(tmp_path / "nowhere.csv"), "nowhere.csv"),
        "wrong format": (_local_simpsons(zipped), "lines.csv"),
        "missing stage input": (["stage", "pretrain", "--profile", "sample", "--input", "prepare=0123456789abcdef"], "0123456789abcdef"),
        "unknown checkpoint": (["generate", "--checkpoint", str(tmp_path / "no-such-checkpoint")], "no-such-checkpoint"),
    }[kind]
    result = homer(*args, data_dir=data_dir)
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert result.returncode == 1, output[-3000:]
    assert len(errors) == 1 and names in errors[0], output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    if kind == "wrong columns":  # --verbose shows the traceback too
        verbose = homer("--verbose", *args, data_dir=data_dir)
        assert verbose.returncode == 1 and "Traceback" in verbose.stdout + verbose.stderr
