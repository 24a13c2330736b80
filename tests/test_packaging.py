"""The installed package stands on its own: a wheel, installed away from the repository, runs
the sample profile's ingest stages on the sample data it carries (model/sample_data/)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent

# Runs in the child: the CLI commands given as JSON, in one process (one interpreter start), then
# where every project module it loaded came from (the stage flows are imported lazily) and where
# the sample files resolve.
DRIVER = """
import json, sys

from flows.cli import app
from model.data.sources import SAMPLE_FILES, sample_file

codes = []
for command in json.loads(sys.argv[1]):
    codes.append(app(command, prog_name="homer", standalone_mode=False) or 0)  # typer.Exit(n) returns n
loaded = {name: m.__file__ for name, m in list(sys.modules.items())
          if name.split(".")[0] in ("flows", "tasks", "model") and getattr(m, "__file__", None)}
samples = {source: str(sample_file(source)) for source in SAMPLE_FILES}
print("HOMER-PACKAGING " + json.dumps({"codes": codes, "modules": loaded, "samples": samples, "sys_path": sys.path}))
"""


def _source_copy(dest: Path) -> Path:
    """What `pip install .` sees in a checkout, without the generated data/ and local state."""
    def ignore(folder, names):
        skip = {n for n in names if n == "__pycache__" or n.endswith((".egg-info", ".pyc"))}
        if Path(folder) == REPO:
            skip |= {n for n in names if n.startswith(".") or n in ("data", "build", "dist")}
        return skip

    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


def _env(tmp: Path, target: Path, api_url: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PYTHON", "HOMER_"))}
    env.update(
        PYTHONPATH=str(target),  # the wheel's code only: no repository, no `pip install -e` finder ahead of it
        PYTHONNOUSERSITE="1",
        PYTHONDONTWRITEBYTECODE="1",
        HOMER_DATA_DIR=str(tmp / "artifacts"),
        PREFECT_HOME=str(tmp / "prefect"),
        PREFECT_API_URL=api_url,  # the session's test server: a temporary server would start in ~20-60 s here
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        HF_HOME=str(tmp / "hf"),
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        KAGGLEHUB_CACHE=str(tmp / "kagglehub"),
    )
    return env


def _pip(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "--no-index", "--disable-pip-version-check", "-q"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"pip {args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def test_wheel_runs_the_sample_ingests_from_any_directory(tmp_path, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    src = _source_copy(tmp_path / "src")
    _pip("wheel", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src))
    (wheel,) = (tmp_path / "dist").glob("recurrent_homer-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    bundled = {p.relative_to(REPO).as_posix() for p in (REPO / "model" / "sample_data").rglob("*") if p.is_file()}
    assert bundled and bundled <= shipped, f"sample files missing from the wheel: {sorted(bundled - shipped)}"

    target = (tmp_path / "target").resolve()
    _pip("install", "--target", str(target), str(wheel))
    shutil.rmtree(src)  # nothing of the checkout copy is left to fall back on
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    stages = ["ingest-simpsons", "ingest-wikipedia"]
    commands = [["stage", stage, "--profile", "sample"] for stage in stages]
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(commands)], cwd=workdir,
                          env=_env(tmp_path, target, PREFECT_API_URL.value()), capture_output=True, text=True, timeout=240)
    report = f"\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert done.returncode == 0, report
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("HOMER-PACKAGING ")]
    seen = json.loads(line.removeprefix("HOMER-PACKAGING "))
    assert seen["codes"] == [0, 0], report

    # the wheel's code and data ran, not the repository's (the editable install's finder must not win)
    assert str(REPO) not in seen["sys_path"]
    assert {"flows", "flows.cli", "model.data.sources", "tasks.data", "flows.ingest_simpsons", "flows.ingest_wikipedia"} <= set(seen["modules"])
    outside = {name: f for name, f in seen["modules"].items() if not Path(f).resolve().is_relative_to(target)}
    assert not outside, f"modules loaded from outside the installed wheel: {outside}"
    for source, path in seen["samples"].items():
        assert Path(path).resolve().is_relative_to(target / "model" / "sample_data"), (source, path)

    for stage in stages:
        stage_dir = tmp_path / "artifacts" / stage
        fp = (stage_dir / "latest").read_text(encoding="utf-8").strip()
        manifest = json.loads((stage_dir / fp / "manifest.json").read_text(encoding="utf-8"))
        assert manifest["stage"] == stage and manifest["fingerprint"] == fp and fp in done.stdout
        if stage == "ingest-simpsons":  # the counts model/sample_data/README.md gives for the bundled files
            assert (stage_dir / fp / "lines.parquet").is_file()
            assert Path(manifest["source_file"]).resolve().is_relative_to(target)
            assert manifest["counts"]["rows_read"] == 1403 and manifest["counts"]["kept"] == 525
        else:
            assert (stage_dir / fp / "articles.parquet").is_file()
            assert manifest["counts"]["articles"] == 56 and manifest["counts"]["chars"] == 132_665
    assert not any(workdir.iterdir()), "the stages wrote into the working directory"
