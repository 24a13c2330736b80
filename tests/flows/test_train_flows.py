"""Training stages and the whole pipeline under Prefect: caching across runs, partial
recomputation, checkpoint mismatch, generation, and resume after SIGKILL via the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, TaskRunFilter, TaskRunFilterFlowRunId

from flows.config import load_config
from model.network.checkpoint import CheckpointError, load_model_from_checkpoint
from model.store.outputs import latest, read_manifest
from tests.helpers import run_twice_at_once

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]

TINY = [
    "pretrain.model.embedding_dim=16", "pretrain.model.hidden_sizes=[32]", "pretrain.model.dropout=0.0",
    "pretrain.train.max_steps=6", "pretrain.train.batch_size=16", "pretrain.train.checkpoint_every_steps=3",
    "pretrain.train.log_every_steps=2", "pretrain.train.max_val_windows=32",
    "finetune.train.max_steps=4", "finetune.train.batch_size=8", "finetune.train.log_every_steps=2",
    "finetune.train.max_val_windows=16", "finetune.train.learning_rate=0.001",
    "report.length=20", "report.num_samples=1", "report.temperatures=[0.5, 1.0]",
]


def task_states(flow_run_id) -> dict[str, str]:
    """Task name -> state name for every task run under a pipeline run and its subflows."""
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[r.id for r in children])))
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs if r.state and r.name.split("-")[0] in
            ("ingest", "prepare", "pretrain", "finetune", "report")}


def run_artifacts(flow_run_id) -> dict:
    """Artifact key -> artifact, for a pipeline run and its subflow runs."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        ids = [flow_run_id, *(r.id for r in children)]
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
    return {a.key: a for a in found if a.key}


def manifest_mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.glob("*/*/manifest.json")}


def test_pipeline_reuses_everything_and_recomputes_only_downstream(data_dir):
    from flows.pipeline import homer_pipeline

    cfg = load_config("sample", None, TINY)
    state = homer_pipeline(cfg, return_state=True)
    refs = state.result()
    assert set(refs) == {"ingest-wikipedia", "ingest-simpsons", "prepare", "pretrain", "finetune", "report"}
    report = (refs["report"].dir / "report.md").read_text()
    assert "bits/char" in report and "temperature 0.5" in report and (refs["report"].dir / "loss.png").stat().st_size > 1000
    first_states = task_states(state.state_details.flow_run_id)
    assert first_states and "Cached" not in first_states.values()
    before = manifest_mtimes(data_dir)

    again = homer_pipeline(cfg, return_state=True)
    assert again.result() == refs
    states = task_states(again.state_details.flow_run_id)
    assert set(states) == {"ingest-wikipedia", "ingest-simpsons", "prepare", "pretrain", "finetune", "report"}
    assert set(states.values()) == {"Cached"}, states
    assert manifest_mtimes(data_dir) == before  # outputs untouched

    # Artifacts where people look: the pipeline run's own summary, and a cached run's stages still publish theirs.
    artifacts = run_artifacts(again.state_details.flow_run_id)
    summary = artifacts["homer-pipeline-summary"]
    assert summary.flow_run_id == again.state_details.flow_run_id
    assert "data:image/png;base64," in summary.data and "test bits/char" in summary.data
    assert summary.data.count("| reused |") == 6 and refs["pretrain"].path in summary.data
    for key in ("homer-pretrain-checkpoint", "homer-pretrain-loss-curves", "homer-finetune-loss-curves", "homer-report"):
        assert key in artifacts, (key, sorted(artifacts))
    assert "(reused)" in artifacts["homer-pretrain-checkpoint"].data

    changed = homer_pipeline(load_config("sample", None, TINY + ["prepare.seq_len=50"]))
    for stage in ("ingest-wikipedia", "ingest-simpsons"):
        assert changed[stage] == refs[stage]
    for stage in ("prepare", "pretrain", "finetune", "report"):
        assert changed[stage].fingerprint != refs[stage].fingerprint
        assert latest(data_dir, stage) == changed[stage]
    shards = read_manifest(changed["pretrain"].dir)["inputs"]["prepare"]["fingerprint"]
    assert shards == changed["prepare"].fingerprint


def test_finetune_rejects_a_checkpoint_with_another_vocabulary(data_dir):
    from flows.finetune import finetune
    from flows.pipeline import homer_pipeline

    refs = homer_pipeline(load_config("sample", None, TINY))
    from flows.prepare import prepare

    other = prepare(load_config("sample", None, ["prepare.min_count=40"]).prepare)  # fewer characters
    with pytest.raises(CheckpointError, match="vocabulary"):
        finetune(load_config("sample", None, TINY).finetune, other, refs["pretrain"])
    assert not list((data_dir / "finetune").glob("*/manifest.json")) or latest(data_dir, "finetune") == refs["finetune"]


def test_generate_flow_and_cli(data_dir):
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.config import GenerateConfig
    from flows.generate import generate_flow
    from flows.pipeline import homer_pipeline

    refs = homer_pipeline(load_config("sample", None, TINY))
    texts = generate_flow(GenerateConfig(prompt="Mmm", length=15, num_samples=4, seed=3))
    assert len(texts) == 4 and all(t.startswith("Mmm") and len(t) == 18 for t in texts)
    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
    keys = {a.key for a in artifact}
    assert "homer-generated-samples" in keys and "homer-pretrain-checkpoint" in keys and "homer-report" in keys
    by_key = {a.key: a for a in artifact}
    for key in ("homer-report", "homer-loss-curves", "homer-pretrain-loss-curves", "homer-finetune-loss-curves"):
        assert by_key[key].type == "markdown", key
        assert "](data:image/png;base64,iVBORw0KGgo" in by_key[key].data, f"{key}: the PNG itself, as a data URI"
    assert "file://" not in by_key["homer-report"].data and "test bits/char" in by_key["homer-report"].data
    for key, out in (("homer-pretrain-checkpoint", refs["pretrain"].dir / "best"), ("homer-prepare-output", refs["prepare"].dir),
                     ("homer-ingest-simpsons-output", refs["ingest-simpsons"].dir)):
        assert by_key[key].type == "markdown" and f"`{out}`" in by_key[key].data and "](" not in by_key[key].data, key

    result = CliRunner().invoke(app, ["generate", "--checkpoint", "latest", "--prompt", "D'oh", "--length", "12",
                                      "--num-samples", "3", "--top-k", "5", "--seed", "1", "--json"])
    assert result.exit_code == 0, result.output
    samples = json.loads(result.output)
    assert len(samples) == 3 and all(s.startswith("D'oh") for s in samples)
    by_path = CliRunner().invoke(app, ["generate", "--checkpoint", str(refs["pretrain"].dir / "best"), "--greedy",
                                       "--length", "5", "-n", "2", "--json"])
    assert by_path.exit_code == 0 and len(set(json.loads(by_path.output))) == 1  # greedy: identical samples
    bad = CliRunner().invoke(app, ["generate", "--checkpoint", "/nonexistent", "-n", "1"])
    assert bad.exit_code == 1 and "/nonexistent" in bad.output


def test_cli_stage_pretrain_killed_and_started_again_resumes(tmp_path, data_dir):
    """`homer stage pretrain` in a real process, SIGKILLed mid-run, then run again."""
    from prefect.settings import PREFECT_API_URL

    from flows.pipeline import homer_pipeline

    sets = TINY[:3] + ["pretrain.train.max_steps=400", "pretrain.train.checkpoint_every_steps=5",
                       "pretrain.train.log_every_steps=5", "pretrain.train.batch_size=8"]
    homer_pipeline(load_config("sample", None, TINY))  # data stages (and a first, different pretrain)
    env = dict(os.environ, HOMER_DATA_DIR=str(data_dir), PREFECT_API_URL=PREFECT_API_URL.value())
    cmd = [sys.executable, "-m", "flows.cli", "stage", "pretrain", "--profile", "sample"] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        states = []
        while time.monotonic() < deadline and proc.poll() is None:
            states = [json.loads(p.read_text())["step"] for p in data_dir.glob("pretrain/*/last/state.json")
                      if not (p.parent.parent / "manifest.json").exists()]
            if states and max(states) >= 10:
                break
            time.sleep(0.2)
        assert states and proc.poll() is None, "training never wrote last/ mid-run"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    out = [p.parent.parent for p in data_dir.glob("pretrain/*/last/state.json") if not (p.parent.parent / "manifest.json").exists()][0]
    killed_at = json.loads((out / "last" / "state.json").read_text())["step"]
    load_model_from_checkpoint(out / "last")  # the checkpoint left behind loads

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    manifest = read_manifest(out)
    assert manifest["counts"]["resumed_from_step"] == killed_at and manifest["counts"]["steps"] == 400
    assert str(out) in again.stdout


def test_a_task_retry_resumes_from_last(data_dir, monkeypatch):
    """The first attempt fails mid-run (after a checkpoint); Prefect's retry continues from last/."""
    import tasks.train as train_tasks
    from flows.pipeline import homer_pipeline
    from flows.pretrain import pretrain

    homer_pipeline(load_config("sample", None, TINY))  # the data stages
    original = train_tasks.prefect_callbacks
    failures = []

    def failing_once(*args, **kwargs):
        callbacks, finished = original(*args, **kwargs)
        log = callbacks.on_log

        def on_log(m):
            log(m)
            if m["step"] >= 9 and not failures:
                failures.append(m["step"])
                raise RuntimeError("a transient failure (test)")

        callbacks.on_log = on_log
        return callbacks, finished

    monkeypatch.setattr(train_tasks, "prefect_callbacks", failing_once)
    cfg = load_config("sample", None, TINY + ["pretrain.train.max_steps=12", "pretrain.train.seed=7"]).pretrain
    ref = pretrain(cfg)
    manifest = read_manifest(ref.dir)
    assert failures == [10] and manifest["counts"]["resumed_from_step"] == 9  # last/ was written at step 9
    assert manifest["counts"]["steps"] == 12


def test_two_runs_of_the_same_training_stage_leave_one_output(data_dir):
    from flows.pipeline import homer_pipeline
    from flows.pretrain import pretrain

    homer_pipeline(load_config("sample", None, TINY))
    cfg = load_config("sample", None, TINY + ["pretrain.train.max_steps=8", "pretrain.train.seed=11"]).pretrain
    results = run_twice_at_once(lambda: pretrain(cfg))
    assert results[0] == results[1]
    assert read_manifest(results[0].dir)["counts"]["steps"] == 8
    load_model_from_checkpoint(results[0].dir / "best")


def test_report_scores_the_models_and_data_that_belong_together(data_dir):
    """Test-split figures for both models; the report follows the finetune manifest, not each stage's latest."""
    from flows.pipeline import homer_pipeline
    from flows.pretrain import pretrain
    from flows.report import report
    from model.store.outputs import StoreError

    refs = homer_pipeline(load_config("sample", None, TINY))
    manifest = read_manifest(refs["report"].dir)
    prepared = read_manifest(refs["prepare"].dir)["counts"]["shards"]
    for model in ("pretrain", "finetune"):
        for corpus in ("wikipedia", "simpsons"):
            for split in ("test", "val"):
                assert 0 < manifest["metrics"][f"{model}_{corpus}_{split}_bpc"] < 10
                assert manifest["counts"][f"{model}_{corpus}_{split}_chars"] == prepared[corpus][split]["scored_chars"] > 0
    assert prepared["simpsons"]["test"]["documents"] > 0 and "test bits/char" in (refs["report"].dir / "report.md").read_text()

    # A newer pretrain becomes latest; a report of the latest finetune still compares the model it started from.
    other = pretrain(load_config("sample", None, TINY + ["pretrain.train.seed=5"]).pretrain)
    assert latest(data_dir, "pretrain") == other != refs["pretrain"]
    again = report(load_config("sample", None, TINY + ["report.seed=1"]).report)
    assert read_manifest(again.dir)["inputs"]["pretrain"]["fingerprint"] == refs["pretrain"].fingerprint
    assert read_manifest(again.dir)["inputs"]["prepare"]["fingerprint"] == refs["prepare"].fingerprint
    with pytest.raises(StoreError, match=f"do not belong together.*pretrain={other.fingerprint}"):
        report(load_config("sample", None, TINY).report, pretrain=other.fingerprint)

    # With finetune.init_from set, the pipeline runs no pretraining that nothing would use.
    before = sorted(p.name for p in (data_dir / "pretrain").iterdir())
    started = homer_pipeline(load_config("sample", None, TINY + [f"finetune.init_from={other.fingerprint}",
                                                                  "pretrain.train.seed=9"]))
    assert "pretrain" not in started and sorted(p.name for p in (data_dir / "pretrain").iterdir()) == before
    assert read_manifest(started["report"].dir)["inputs"]["pretrain"]["fingerprint"] == other.fingerprint


def test_a_stage_run_on_its_own_starts_from_its_latest_config(data_dir):
    """Re-running prepare with one changed field (CLI and deployment parameters) changes that field alone."""
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.config import changed_fields
    from flows.pipeline import homer_pipeline
    from flows.prepare import prepare

    refs = homer_pipeline(load_config("sample", None, TINY))
    first = read_manifest(refs["prepare"].dir)["config"]
    assert first["lines_per_doc"] == 10  # the sample profile's, not the default 20

    result = CliRunner().invoke(app, ["stage", "prepare", "--set", "prepare.seq_len=50"])
    assert result.exit_code == 0, result.output
    assert f"the config of prepare {refs['prepare'].fingerprint}" in result.output and "changed: seq_len" in result.output
    by_cli = latest(data_dir, "prepare")
    assert changed_fields(first, read_manifest(by_cli.dir)["config"]) == ["seq_len"]

    # what `prepare deployment run --params '{"config": {"val_fraction": 0.2}}'` hands the flow
    params = prepare.validate_parameters({"config": {"val_fraction": 0.2}})
    state = prepare(config=params["config"], return_state=True)  # start_from by its default, as a deployment run
    by_deployment = state.result()
    with get_client(sync_client=True) as client:  # named after the merge: seq_len 50 came from the latest config
        assert client.read_flow_run(state.state_details.flow_run_id).name == "prepare from=latest seq_len=50 val=0.2"
    assert changed_fields(read_manifest(by_cli.dir)["config"], read_manifest(by_deployment.dir)["config"]) == ["val_fraction"]

    # an explicit profile still wins over the latest config (whose val_fraction is 0.2)
    result = CliRunner().invoke(app, ["stage", "prepare", "--profile", "sample", "--set", "prepare.seq_len=50"])
    assert result.exit_code == 0, result.output
    assert read_manifest(latest(data_dir, "prepare").dir)["config"]["val_fraction"] == 0.1


def test_an_interrupt_reads_like_an_interrupt_and_the_printed_command_resumes(tmp_path, data_dir):
    """A real Ctrl-C mid-training: one line naming the step and the command, exit 130, the run Cancelled.

    (SIGTERM takes the same path: the e2e cancel test sends it through a worker.)
    """
    signum = signal.SIGINT
    import shlex

    from prefect.client.schemas.filters import FlowRunFilterName
    from prefect.settings import PREFECT_API_URL

    from flows.pipeline import homer_pipeline

    homer_pipeline(load_config("sample", None, TINY))  # the data stages
    sets = TINY[:3] + ["pretrain.train.max_steps=150", "pretrain.train.checkpoint_every_steps=5",
                       "pretrain.train.batch_size=8", "pretrain.train.seed=2"]
    env = dict(os.environ, HOMER_DATA_DIR=str(data_dir), PREFECT_API_URL=PREFECT_API_URL.value())
    cmd = [sys.executable, "-m", "flows.cli", "stage", "pretrain", "--profile", "sample"] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any(json.loads(p.read_text())["step"] >= 10 for p in data_dir.glob("pretrain/*/last/state.json")
               if not (p.parent.parent / "manifest.json").exists()):
            break
        time.sleep(0.2)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stdout + stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("interrupted at step")]
    step = int(line.split()[3].rstrip(";"))
    command = line.split("`")[1]
    assert command == "homer " + shlex.join(cmd[3:])
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_="pretrain from=config")))
    ours = [r for r in runs if r.parameters.get("config", {}).get("train", {}).get("max_steps") == 150]
    assert [r.state.name for r in ours] == ["Cancelled"], [(r.name, r.state.name) for r in ours]

    again = subprocess.run([sys.executable, "-m", "flows.cli", *shlex.split(command)[1:]], env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    out = latest(data_dir, "pretrain")
    manifest = read_manifest(out.dir)
    assert manifest["counts"]["resumed_from_step"] == step and manifest["counts"]["steps"] == 150
