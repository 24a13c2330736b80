"""Operating the pipeline the way Prefect users do, against the real thing.

A real `prefect server` on a free loopback port (with an auth string), the `homer-pool` and
`homer-gpu` process pools, the repository's prefect.yaml deployed as it is with `prefect deploy
--all`, and a `prefect worker` on each pool (training runs on the homer-gpu one). Runs are
created through the API with the sample parameters (the sample profile's sections; tiny
training settings), as an operator would fill the run form. The tests build on each other in
file order: ingest -> prepare -> pretrain (alone, on what prepare wrote) -> finetune and report
-> the run's page and the loss-curve artifact pages in Chromium (logged in) -> cancel -> kill
the training worker -> `homer serve`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import struct
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from flows.config import PROFILES, PretrainConfig
from model.store.outputs import StageRef, latest, read_manifest
from tasks.common import stage_fingerprint
from tasks.stages import STAGES
from tests.e2e.conftest import GPU_POOL, POOL, POOLS, REPO, alive, send, wait_until
from tests.e2e.test_deployments import expected_pool

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SAMPLE = PROFILES["sample"]
TINY_MODEL = {"embedding_dim": 16, "hidden_sizes": [32], "dropout": 0.0}


def pretrain_parameters(**train) -> dict:
    settings = {"epochs": 1, "max_steps": 20, "batch_size": 16, "checkpoint_every_steps": 5, "log_every_steps": 5,
                "early_stopping_patience": None, **train}
    return {"config": {"model": TINY_MODEL, "train": settings}}


class Seen(dict):
    """What earlier tests produced (run ids, fingerprints) for the later ones."""

    def need(self, key: str):
        if key not in self:
            pytest.skip(f"needs {key!r} from an earlier test in this module; run the whole module")
        return self[key]


@pytest.fixture(scope="module")
def seen() -> Seen:
    return Seen()


def keys_of(artifacts: list[dict]) -> set[str]:
    return {a["key"] for a in artifacts if a.get("key")}


def location_path(artifacts: list[dict], key: str) -> Path:
    """The local path a location artifact shows as text (a local root: no link, no file:// URI)."""
    (artifact,) = [a for a in artifacts if a["key"] == key]
    assert artifact["type"] == "markdown" and "file://" not in artifact["data"] and "](" not in artifact["data"], artifact["data"]
    match = re.search(r"^- location: `([^`]+)`$", artifact["data"], re.MULTILINE)
    assert match, artifact["data"]
    return Path(match.group(1))


def png_of(artifacts: list[dict], key: str) -> bytes:
    """The PNG a markdown artifact carries as a `data:image/png;base64,` image (one per artifact)."""
    (artifact,) = [a for a in artifacts if a["key"] == key]
    assert artifact["type"] == "markdown", artifact["type"]
    (encoded,) = re.findall(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", artifact["data"])
    return base64.b64decode(encoded)


def artifact_id(artifacts: list[dict], key: str) -> str:
    (artifact,) = [a for a in artifacts if a["key"] == key]
    return artifact["id"]


def expected_pretrain_dir(stack, parameters: dict, prepare: StageRef) -> Path:
    fp = stage_fingerprint("pretrain", PretrainConfig.model_validate(parameters["config"]), {"prepare": prepare})
    return stack.data_dir / "pretrain" / fp


def training_step(out: Path) -> int:
    try:
        return json.loads((out / "last" / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


# ---- deploying -----------------------------------------------------------------------

def test_prefect_deploy_all_creates_every_deployment(stack):
    import yaml

    expected = {d["name"] for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    deployments = {d["name"]: d for d in stack.rest("POST", "/deployments/filter", json={})}
    assert set(deployments) == expected, stack.deploy_output
    for pool in POOLS:
        assert stack.rest("GET", f"/work_pools/{pool}")["type"] == "process"
    for name, d in deployments.items():
        assert d["work_pool_name"] == expected_pool(name), name  # training on homer-gpu
        assert d["enforce_parameter_schema"] is True, name
        assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}], name
        config = d["parameter_openapi_schema"]["properties"]["config"]
        assert "$ref" in config and config["default"], f"{name}: the run form should show the typed config"
    (schedule,) = deployments["scheduled"]["schedules"]
    assert schedule["active"] is True
    assert schedule["schedule"]["cron"] == "0 3 * * 1" and schedule["schedule"]["timezone"] == "UTC"
    assert deployments["sample"]["parameters"]["config"]["profile"] == "sample"
    gpu = stack.rest("GET", "/v2/concurrency_limits/gpu")
    assert gpu["limit"] == 1 and gpu["active"]


def test_the_schedule_creates_the_weekly_runs(stack):
    """The server's scheduler turns the cron schedule into Scheduled runs: Mondays, 03:00 UTC."""
    deployment = str(stack.deployment_id("homer-pipeline/scheduled"))

    def scheduled():
        return stack.rest("POST", "/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [deployment]}}})

    def scheduler_errors() -> str:
        log = (stack.logs / "server.log").read_text(errors="replace")
        hint = ("\nSQLAlchemy 2.1 breaks Prefect 3.8's scheduler (\"Can't evaluate bulk DML statement\"): "
                "pin sqlalchemy<2.1" if "Can't evaluate bulk DML" in log else "")
        return stack.log_tail("server") + hint

    runs = wait_until("the scheduler to create the scheduled deployment's runs", scheduled, timeout=90,
                      interval=1, detail=scheduler_errors)
    for run in runs:
        start = datetime.fromisoformat(run["expected_start_time"].replace("Z", "+00:00")).astimezone(timezone.utc)
        assert (start.weekday(), start.hour, start.minute) == (0, 3, 0), start
        assert run["state_type"] == "SCHEDULED"
        assert run["parameters"] == {}  # the published recipe


def test_a_parameter_of_the_wrong_type_is_refused_naming_the_field(stack):
    from prefect.exceptions import PrefectHTTPStatusError

    cases = [
        ("prepare/prepare", {"config": {"seq_len": "abc"}}, "seq_len"),
        ("pretrain/pretrain", {"config": {"train": {"batch_size": "big"}}}, "batch_size"),
        ("pretrain/pretrain", {"config": {"model": {"cell": "transformer"}}}, "cell"),
        ("homer-pipeline/sample", {"config": {"prepare": {"seq_lenght": 50}}}, "seq_lenght"),
    ]
    for deployment, parameters, field in cases:
        with pytest.raises(PrefectHTTPStatusError) as refused:
            stack.trigger(deployment, parameters)
        assert refused.value.response.status_code == 409, refused.value.response.text
        assert field in refused.value.response.json()["detail"], refused.value.response.text
    ids = [str(stack.deployment_id(name)) for name, _, _ in cases]
    runs = stack.rest("POST", "/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": ids}}})
    assert runs == [], "a refused run must not be created"


# ---- running stages through the worker -------------------------------------------------

def test_prepare_runs_on_the_worker_and_publishes_artifacts(stack, seen):
    ingests = {stage: stack.trigger(f"{stage}/{stage}", {"config": SAMPLE[section]})
               for stage, section in (("ingest-wikipedia", "wikipedia"), ("ingest-simpsons", "simpsons"))}
    for stage, run_id in ingests.items():
        run = stack.wait_final(run_id, timeout=150)
        assert run["name"].startswith(f"{stage} from=latest source=sample"), run["name"]
        assert {f"homer-{stage}-output", f"homer-{stage}-counts"} <= keys_of(stack.artifacts(run_id))

    run_id = stack.trigger("prepare/prepare", {"config": SAMPLE["prepare"]})  # no upstream: the latest ingests
    run = stack.wait_final(run_id, timeout=120)
    assert run["name"] == "prepare from=latest seq_len=100 val=0.1", run["name"]
    artifacts = stack.artifacts(run_id)
    assert {"homer-prepare-output", "homer-prepare-counts"} <= keys_of(artifacts)
    out = location_path(artifacts, "homer-prepare-output")
    manifest = read_manifest(out)
    assert out.parent.parent == stack.data_dir and manifest["stage"] == "prepare"
    for stage, name in (("ingest-wikipedia", "wikipedia"), ("ingest-simpsons", "simpsons")):
        assert manifest["inputs"][name]["fingerprint"] == latest(stack.data_dir, stage).fingerprint
    (counts,) = [a for a in artifacts if a["key"] == "homer-prepare-counts"]
    table = json.loads(counts["data"]) if isinstance(counts["data"], str) else counts["data"]
    rows = {row["metric"]: row["value"] for row in table}
    assert rows["vocab_size"] == manifest["counts"]["vocab_size"]
    assert sorted(p.name for p in (out / "shards" / "wikipedia").glob("train-*.parquet"))
    seen["prepare"] = StageRef(stage="prepare", fingerprint=manifest["fingerprint"], path=str(out))


def test_pretrain_alone_trains_on_the_shards_prepare_just_wrote(stack, seen):
    from model.network.checkpoint import load_model_from_checkpoint

    prepare: StageRef = seen.need("prepare")
    parameters = pretrain_parameters()
    run_id = stack.trigger("pretrain/pretrain", parameters)  # no `prepare` given
    run = stack.wait_final(run_id, timeout=150)
    assert run["name"] == "pretrain from=latest cell=gru hidden=32 lr=0.001 epochs=1", run["name"]
    artifacts = stack.artifacts(run_id)
    assert {"homer-pretrain-checkpoint", "homer-pretrain-summary", "homer-pretrain-progress", "homer-pretrain-loss-curves"} <= keys_of(artifacts)
    best = location_path(artifacts, "homer-pretrain-checkpoint")
    out = best.parent
    assert out == expected_pretrain_dir(stack, parameters, prepare)
    manifest = read_manifest(out)
    assert manifest["inputs"]["prepare"]["fingerprint"] == prepare.fingerprint
    assert Path(manifest["inputs"]["prepare"]["path"]) == prepare.dir
    assert manifest["counts"]["steps"] == 20
    model, vocab, state = load_model_from_checkpoint(best)
    assert vocab.fingerprint == read_manifest(prepare.dir)["counts"]["vocab_fingerprint"]
    assert latest(stack.data_dir, "pretrain").fingerprint == out.name
    assert png_of(artifacts, "homer-pretrain-loss-curves") == (out / "loss.png").read_bytes()
    seen["pretrain"] = StageRef(stage="pretrain", fingerprint=out.name, path=str(out))
    seen["pretrain_run"] = run
    seen["pretrain_artifacts"] = sorted(keys_of(artifacts))
    seen["pretrain_loss_curves"] = (artifact_id(artifacts, "homer-pretrain-loss-curves"), out / "loss.png")


def test_finetune_and_report_publish_the_loss_curves_as_images(stack, seen):
    """The smallest finetune and report on that pretrain: the report's artifacts carry loss.png itself."""
    pretrain: StageRef = seen.need("pretrain")
    settings = {"epochs": 1, "max_steps": 10, "batch_size": 16, "checkpoint_every_steps": 5, "log_every_steps": 5,
                "early_stopping_patience": None, "max_val_windows": 16}
    run_id = stack.trigger("finetune/finetune", {"config": {"train": settings}, "pretrain": pretrain.fingerprint})
    stack.wait_final(run_id, timeout=150)
    artifacts = stack.artifacts(run_id)
    finetune = location_path(artifacts, "homer-finetune-checkpoint").parent
    assert png_of(artifacts, "homer-finetune-loss-curves") == (finetune / "loss.png").read_bytes()

    run_id = stack.trigger("report/report", {"config": {"length": 20, "num_samples": 1, "temperatures": [1.0]},
                                             "finetune": finetune.name})
    stack.wait_final(run_id, timeout=150)
    artifacts = stack.artifacts(run_id)
    assert {"homer-report", "homer-report-bpc", "homer-loss-curves"} <= keys_of(artifacts)
    out = latest(stack.data_dir, "report").dir
    assert read_manifest(out)["inputs"]["finetune"]["fingerprint"] == finetune.name
    png = (out / "loss.png").read_bytes()
    assert png_of(artifacts, "homer-report") == png_of(artifacts, "homer-loss-curves") == png
    assert len(png) < 150_000, f"loss.png is {len(png)} bytes; the UI loads it with the artifact"
    (report,) = [a for a in artifacts if a["key"] == "homer-report"]
    assert "test bits/char" in report["data"] and "file://" not in report["data"]
    seen["report_artifact"] = (artifact_id(artifacts, "homer-report"), out / "loss.png")


# ---- the UI --------------------------------------------------------------------------

def test_flow_run_page_shows_name_state_and_artifact_keys(stack, seen, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    run, keys = seen.need("pretrain_run"), seen.need("pretrain_artifacts")
    browser.get(f"{stack.ui_url}/runs/flow-run/{run['id']}")
    wait = WebDriverWait(browser, 60)

    def body_has(*texts):
        return lambda d: all(t in d.find_element(By.TAG_NAME, "body").text for t in texts)

    try:
        wait.until(body_has(run["name"], "Completed"))
        tab = wait.until(EC.element_to_be_clickable((By.XPATH, "//li[contains(@class, 'p-tab') and normalize-space()='Artifacts']")))
        tab.click()
        wait.until(body_has(*keys))
    except Exception:
        browser.save_screenshot(str(tmp_path / "failed.png"))
        pytest.fail(f"the run page did not show {run['name']!r}, Completed and {keys}; screenshot {tmp_path / 'failed.png'}; "
                    f"page text:\n{browser.find_element(By.TAG_NAME, 'body').text[:3000]}", pytrace=False)
    text = browser.find_element(By.TAG_NAME, "body").text
    assert "Connection refused" not in text and "Can't connect" not in text
    shot = tmp_path / "flow-run.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if target := os.environ.get("HOMER_SCREENSHOT"):  # e.g. docs/flow-run.png, to refresh the README's picture
        shutil.copyfile(shot, REPO / target)


# A loaded <img> of the artifact's data URI: [naturalWidth, naturalHeight], else null.
LOADED_PNG = """
const img = [...document.querySelectorAll('img')].find(i => i.src.startsWith('data:image/png'));
return img && img.complete && img.naturalWidth > 0 ? [img.naturalWidth, img.naturalHeight] : null;
"""


def test_the_loss_curves_show_as_images_on_their_artifact_pages(stack, seen, browser, tmp_path):
    """The report's page and pretrain's loss-curve page in the UI show the PNG, loaded (no server of ours)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    pages = {"homer-report": seen.need("report_artifact"), "homer-pretrain-loss-curves": seen.need("pretrain_loss_curves")}
    for key, (artifact, png) in pages.items():
        browser.get(f"{stack.ui_url}/artifacts/artifact/{artifact}")
        try:
            size = WebDriverWait(browser, 60, poll_frequency=0.5).until(
                lambda d: key in d.find_element(By.TAG_NAME, "body").text and d.execute_script(LOADED_PNG))
        except Exception:
            shot = tmp_path / f"{key}-failed.png"
            browser.save_screenshot(str(shot))
            pytest.fail(f"the page of artifact {key} ({artifact}) showed no loaded data:image/png <img>; screenshot {shot}; "
                        f"page text:\n{browser.find_element(By.TAG_NAME, 'body').text[:3000]}", pytrace=False)
        assert size == list(struct.unpack(">II", png.read_bytes()[16:24])), f"{key}: not the size of {png}"  # IHDR
        if key == "homer-report":
            assert "Bits per character on held-out text" in browser.find_element(By.TAG_NAME, "body").text
        browser.save_screenshot(str(tmp_path / f"{key}.png"))


# ---- failure behaviour ---------------------------------------------------------------

def test_cancelling_a_run_stops_training_within_seconds_and_keeps_last_loadable(stack, seen, record_property):
    """The published model (9.3M parameters): one of its steps takes tens of seconds on these CPUs, and the
    cancel must still end the run within 10 s, saving last/ from the start of the step in progress."""
    from prefect.states import Cancelling

    from model.network.checkpoint import load_model_from_checkpoint
    from model.network.rnn import ModelConfig

    train = {"epochs": 1000, "max_steps": 1_000_000, "checkpoint_every_steps": 5, "log_every_steps": 5,
             "early_stopping_patience": None}
    # The published model, given in full: a stage run on its own otherwise starts from its latest output's (tiny) model.
    parameters = {"config": {"model": ModelConfig().model_dump(mode="json"), "train": train}}  # would run for days
    seen.need("prepare")
    run_id = stack.trigger("pretrain/pretrain", parameters)
    started = wait_until("the run's logs to say training started",
                         lambda: re.search(r"training pretrain into (\S+): \d+ steps planned", "\n".join(stack.run_logs(run_id))),
                         timeout=120, interval=0.3, detail=lambda: stack.describe(run_id))
    out = Path(started.group(1))  # (its other train fields come from the latest pretrain output: "like last time")
    time.sleep(4)  # inside the first step: reading the shards and building the model take about a second
    pid = int(str(stack.flow_run(run_id)["infrastructure_pid"]).rsplit(":", 1)[-1])

    worker_log = stack.logs / "gpu-worker-1.log"  # the worker of the training pool ran it
    log_before = worker_log.stat().st_size
    started = time.monotonic()
    stack.client.set_flow_run_state(run_id, Cancelling(), force=True)  # what the UI's Cancel button does
    run = wait_until("the cancelled run to reach a final state", lambda: (r := stack.flow_run(run_id))["state_type"]
                     in ("CANCELLED", "FAILED", "CRASHED", "COMPLETED") and r, timeout=45, detail=lambda: stack.describe(run_id))
    took = time.monotonic() - started
    record_property("seconds_to_cancelled", round(took, 1))
    assert run["state_type"] == "CANCELLED", stack.describe(run_id)
    assert took < 10, f"cancellation took {took:.1f}s"
    wait_until(f"the flow-run process {pid} to exit", lambda: not alive(pid), timeout=15)
    with open(worker_log, "rb") as log:  # a cancel that was asked for is no error
        log.seek(log_before)
        errors = [line for line in log.read().decode(errors="replace").splitlines() if "| ERROR" in line or " ERROR " in line]
    assert not errors, errors

    assert not (out / "manifest.json").exists(), "a cancelled run must not look complete"
    step = training_step(out)
    model, vocab, state = load_model_from_checkpoint(out / "last")
    assert state["step"] == step and not state["done"] and state["num_parameters"] > 9_000_000
    wait_until("the run's logs to say training stopped on request",
               lambda: "stopped on request" in "\n".join(stack.run_logs(run_id)), timeout=15,
               detail=lambda: stack.describe(run_id))
    gpu = stack.rest("GET", "/v2/concurrency_limits/gpu")
    assert gpu["active_slots"] == 0, "the cancelled run must give the gpu slot back"


def test_a_worker_killed_mid_run_corrupts_nothing_and_the_rerun_resumes(stack, seen):
    from prefect.states import Crashed

    from model.network.checkpoint import load_model_from_checkpoint

    parameters = pretrain_parameters(epochs=10, max_steps=100)
    out = expected_pretrain_dir(stack, parameters, seen.need("prepare"))
    latest_before = latest(stack.data_dir, "pretrain").fingerprint
    run_id = stack.trigger("pretrain/pretrain", parameters)
    wait_until(f"{out}/last/state.json at step >= 10", lambda: training_step(out) >= 10, timeout=120,
               interval=0.2, detail=lambda: stack.describe(run_id))

    # kill -9 the worker's process group and the flow run's own (it runs in a session of its own)
    worker = stack.procs.pop("gpu-worker-1")  # the training pool's worker
    stack.workers.pop("gpu-worker-1")
    flow_pid = int(str(stack.flow_run(run_id)["infrastructure_pid"]).rsplit(":", 1)[-1])
    send(worker.pid, signal.SIGKILL)
    send(flow_pid, signal.SIGKILL)
    worker.wait(timeout=10)
    wait_until(f"flow-run process {flow_pid} to die", lambda: not alive(flow_pid), timeout=10)
    killed_at = training_step(out)
    assert 10 <= killed_at < 100

    # nothing half-written looks finished, and the stage's `latest` is untouched
    assert not (out / "manifest.json").exists()
    assert latest(stack.data_dir, "pretrain").fingerprint == latest_before
    assert not list((stack.data_dir / "prepare").glob(".*.tmp-*")), "prepare's output is untouched"
    load_model_from_checkpoint(out / "last")

    # what an operator (or a zombie-run automation) does: mark the orphan Crashed, and free the
    # gpu slot the killed process held (its 60 s lease would expire a minute later)
    stack.client.set_flow_run_state(run_id, Crashed(message="worker killed (test)"), force=True)
    held = stack.rest("GET", "/v2/concurrency_limits/gpu")["active_slots"]
    print(f"gpu slots still held after the kill: {held}")
    if held:
        stack.cli("gcl", "update", "gpu", "--active-slots", "0")

    stack.start_worker("gpu-worker-2", GPU_POOL)
    rerun_id = stack.trigger("pretrain/pretrain", parameters)
    stack.wait_final(rerun_id, timeout=150)
    logs = "\n".join(stack.run_logs(rerun_id))
    assert f"resuming pretrain from {out / 'last'}" in logs, logs[-3000:]

    manifest = read_manifest(out)
    assert manifest["counts"]["steps"] == 100
    assert manifest["counts"]["resumed_from_step"] == killed_at  # from the last/ the kill left
    for kind in ("last", "best"):
        load_model_from_checkpoint(out / kind)
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    log_steps = [e["step"] for e in entries if e["kind"] == "log"]
    assert log_steps == list(range(5, 101, 5)), "metrics.jsonl: one entry per logged step, none lost or repeated"
    assert latest(stack.data_dir, "pretrain").fingerprint == out.name
    assert not list(out.glob("*.tmp-*")), "no staging leftovers"


# ---- homer serve ---------------------------------------------------------------------

def test_homer_serve_serves_every_deployment_from_one_process(stack):
    """`homer serve --profile sample` takes the deployments over (same names) and runs them
    itself, with the profile's fields as the deployments' parameters."""
    stack.stop_workers()  # nothing but the serve process may run this
    homer = str(Path(os.environ.get("VIRTUAL_ENV", Path(sys.executable).parent.parent)) / "bin" / "homer")
    serve = stack.spawn("serve", argv=[homer, "serve", "--profile", "sample"])

    def served():
        if serve.poll() is not None:
            pytest.fail(f"`homer serve` exited {serve.returncode}\n{stack.log_tail('serve')}", pytrace=False)
        deployments = {d["name"]: d for d in stack.rest("POST", "/deployments/filter", json={})}
        return deployments["ingest-simpsons"]["parameters"] == {"config": {"source": "sample"}} and deployments

    deployments = wait_until("`homer serve` to register every deployment", served, timeout=90,
                             detail=lambda: stack.log_tail("serve"))
    assert set(deployments) >= {"scheduled", "sample", "ingest-wikipedia", "ingest-simpsons", "prepare", "pretrain",
                                "finetune", "report", "generate"}
    (schedule,) = deployments["scheduled"]["schedules"]
    assert (schedule["schedule"]["cron"], schedule["schedule"]["timezone"]) == ("0 3 * * 1", "UTC")
    assert deployments["ingest-simpsons"]["parameters"] == {"config": {"source": "sample"}}

    run_id = stack.trigger("ingest-simpsons/ingest-simpsons")  # no parameters: the served sample ones
    run = stack.wait_final(run_id, timeout=120)
    assert run["name"].startswith("ingest-simpsons from=latest source=sample"), run["name"]
    assert str(run_id) in (stack.logs / "serve.log").read_text(), "the serve process should have run it"
    assert {"homer-ingest-simpsons-output", "homer-ingest-simpsons-counts"} <= keys_of(stack.artifacts(run_id))


def test_rerunning_prepare_through_the_api_changes_the_given_field_alone(stack, seen):
    """`prefect deployment run prepare/prepare --params '{"config": {"seq_len": 50}}'` after a sample run: like last
    time (the sample's lines_per_doc, not the default), with seq_len changed. Last in the module: it moves prepare/latest."""
    from flows.config import changed_fields

    first: StageRef = seen.need("prepare")
    run_id = stack.trigger("prepare/prepare", {"config": {"seq_len": 50}})
    run = stack.wait_final(run_id, timeout=120)
    assert run["state_type"] == "COMPLETED", stack.describe(run_id)
    out = location_path(stack.artifacts(run_id), "homer-prepare-output")
    assert out != first.dir and latest(stack.data_dir, "prepare").fingerprint == out.name
    assert changed_fields(read_manifest(first.dir)["config"], read_manifest(out)["config"]) == ["seq_len"]
    assert f"the config of prepare {first.fingerprint}" in "\n".join(stack.run_logs(run_id))
