"""`homer sweep` on the sample data with a tiny model: three trials (one pruned), the trials table and plots in the
UI, the best config loaded by load_config, a second run (the CLI) continuing the study, and two sweep processes
filling one study in PostgreSQL without running a trial twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect import get_client
from typer.testing import CliRunner

from flows.config import load_config
from model.store.outputs import latest

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]

TINY = ["pretrain.model.embedding_dim=16", "pretrain.model.hidden_sizes=[32]", "pretrain.model.dropout=0.0",
        "pretrain.train.max_steps=6", "pretrain.train.batch_size=16", "pretrain.train.eval_every_steps=2",
        "pretrain.train.log_every_steps=2", "pretrain.train.max_val_windows=32", "pretrain.train.checkpoint_every_steps=0"]
LR = "pretrain.train.learning_rate"
SPACE = {LR: {"low": 1e-6, "high": 3e-2, "log": True}}


def this_run(output: str) -> set[int]:
    """The trial numbers a `homer sweep` process reports as its own: `... this run 0, 2; ...`."""
    return set(map(int, output.split("this run ", 1)[1].split(";", 1)[0].split(", ")))


@pytest.fixture(scope="module")
def sample_root(prefect_harness, tmp_path_factory) -> Path:
    """An artifact root with the sample data ingested and prepared (what every trial trains on)."""
    from flows.ingest_simpsons import ingest_simpsons
    from flows.ingest_wikipedia import ingest_wikipedia
    from flows.prepare import prepare

    root = tmp_path_factory.mktemp("sweep") / "data"
    cfg = load_config("sample")
    ingest_wikipedia(cfg.wikipedia, data_dir=str(root))
    ingest_simpsons(cfg.simpsons, data_dir=str(root))
    prepare(cfg.prepare, data_dir=str(root))
    return root


def artifact(key: str):
    with get_client(sync_client=True) as client:
        return {a.key: a for a in client.read_latest_artifacts()}[key]


def test_a_sweep_prunes_a_bad_trial_writes_the_best_config_and_continues(sample_root, tmp_path, monkeypatch):
    from flows.cli import app
    from flows.sweep import homer_sweep
    from model.training.sweep import SweepConfig

    monkeypatch.setenv("HOMER_DATA_DIR", str(sample_root))
    cfg = load_config("sample", None, TINY)
    # trial 0 learns; trial 1 (a learning rate far too small) is worse at its first validation: pruned; trial 2 is drawn
    sweep = SweepConfig(trials=3, parallel=1, seed=0, pruner_startup_trials=1, enqueue=[{LR: 0.01}, {LR: 1e-6}])
    summary = homer_sweep("pretrain", cfg, sweep, SPACE, str(sample_root))
    assert summary["this_run"] == [0, 1, 2] and summary["trials"] == 3

    rows = artifact("homer-sweep-trials").data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert len(rows) == 3 and [r["trial"] for r in rows] == [0, 1, 2]
    assert set(rows[0]) == {"trial", "train.learning_rate", "state", "best_val_bpc", "steps", "seconds", "output"}
    assert rows[0]["state"] == "complete" and rows[0]["steps"] == 6
    assert rows[1]["state"] == "pruned" and rows[1]["steps"] == 2 and rows[1]["best_val_bpc"] > rows[0]["best_val_bpc"]
    pruned = sample_root / "pretrain" / rows[1]["output"]
    assert (pruned / "last").is_dir() and not (pruned / "manifest.json").exists()  # incomplete: never reused as finished
    plots = artifact("homer-sweep-plots").data
    assert plots.count("](data:image/png;base64,iVBORw0KGgo") == 2 and summary["study"] in plots

    best = summary["best"]
    assert best["value"] == min(r["best_val_bpc"] for r in rows if r["state"] == "complete") or \
        round(best["value"], 4) == min(r["best_val_bpc"] for r in rows if r["state"] == "complete")
    best_yaml = Path(summary["best_config"])
    assert best_yaml.parent == sample_root / "sweeps" / summary["study"]
    reloaded = load_config("default", best_yaml)  # as `homer run --config best.yaml` reads it
    assert reloaded.pretrain.train.learning_rate == best["params"][LR]
    assert reloaded.pretrain.model.hidden_sizes == [32] and reloaded.wikipedia.source == "sample"
    assert latest(sample_root, "pretrain").fingerprint == best["fingerprint"]  # the next stage starts from the best trial

    # the same sweep again, from the CLI: the same study, trial numbers go on, two at once
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(SPACE), encoding="utf-8")
    out = tmp_path / "best.yaml"
    args = ["sweep", "pretrain", "--profile", "sample", "--trials", "2", "--parallel", "2", "--space", str(space_file),
            "--out", str(out), *[a for s in TINY for a in ("--set", s)]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"study {summary['study']} " in result.output and "this run 3, 4;" in result.output
    rows = artifact("homer-sweep-trials").data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert [r["trial"] for r in rows] == [0, 1, 2, 3, 4]
    assert out.read_text() == best_yaml.read_text()


def test_two_sweep_processes_share_one_study_in_postgresql_without_running_a_trial_twice(sample_root, tmp_path):
    """Two `homer sweep` processes started at once on one study: distinct trial numbers, the total of both, each run once."""
    import optuna
    from prefect.settings import PREFECT_API_URL

    from tests.postgres import fresh_database, postgres_problem

    if (why := postgres_problem()) is not None:
        pytest.skip(why)
    with fresh_database("homer_sweep") as db:
        env = dict(os.environ, HOMER_DATA_DIR=str(sample_root), PREFECT_API_URL=PREFECT_API_URL.value())
        space_file = tmp_path / "space.yaml"
        space_file.write_text(yaml.safe_dump(SPACE), encoding="utf-8")
        cmd = [sys.executable, "-m", "flows.cli", "sweep", "pretrain", "--profile", "sample", "--trials", "2",
               "--storage", db.url, "--study", "shared", "--space", str(space_file), *[a for s in TINY for a in ("--set", s)]]
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        outputs = [p.communicate(timeout=300)[0] for p in procs]
        for p, text in zip(procs, outputs):
            assert p.returncode == 0, text[-3000:]
        runs = [this_run(text) for text in outputs]
        study = optuna.load_study(study_name="shared", storage=db.url)
        numbers = [t.number for t in study.trials]
        assert sorted(numbers) == [0, 1, 2, 3] and len(set(numbers)) == 4
        assert runs[0].isdisjoint(runs[1]) and runs[0] | runs[1] == {0, 1, 2, 3}, runs
        outcomes = [t.user_attrs["outcome"] for t in study.trials]
        assert all(o["state"] in ("complete", "pruned") for o in outcomes), outcomes
        # a trial that drew parameters another had already trained reused that output rather than training it again
        trained = [o["fingerprint"] for o in outcomes if not o["reused"]]
        assert len(trained) == len(set(trained)), outcomes
