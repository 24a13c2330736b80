"""Faults on the cluster (tests/cluster/conftest.py), each ending with nothing lost (issue 12, item 5).

Hosts of their own on a bridge: the Prefect server on PostgreSQL, moto's S3 API on the storage host,
the data stages on the CPU host, training on `train-1` and (added here) `train-2`. Every training run
here takes the `gpu` slot, sends a heartbeat every 30 s and writes its output under a Prefect lease
(faults_support.RUN_ENV); the zombie automation of flows/automations.py is installed on the server.
Each test trains a tiny model with a seed of its own (so an output of its own), injects one fault
and checks that nothing was lost:

- d: two hosts start the same training at once: one trains, the other waits for the lease and reuses it;
- e: a host dies holding the `gpu` slot: the slot comes free when its lease runs out, and the next run proceeds;
- a: a training host dies mid-run: the run is marked Crashed, its retry resumes on the other training host
  from the last step in the bucket, and the weights equal an uninterrupted run's bit for bit;
- c: the Prefect server restarts mid-run (PostgreSQL keeps its state): the run finishes, once;
- b: the link to the storage host goes down while a training commits its output: nothing reads as complete,
  no `latest` moves, the retry completes it once the link is back, and `homer gc` lists and removes the leftovers.

    .venv/bin/python -m pytest tests/cluster/test_faults.py -x -q      # as root
"""

from __future__ import annotations

import time

import pytest

from tests.cluster.conftest import PYTHON, run_data_stages
from tests.cluster.faults_support import (LEASES_SURVIVE_RESTART, VENV_BIN, bucket, homer_stage, host_of, metrics_steps,
                                          pretrain_parameters, pushed_step, read_json, slots, slow_link, training_fp, trigger)
from tests.e2e.conftest import FINAL, GPU_POOL, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ZOMBIE_WITHIN_S = 60  # the automation's window: two heartbeats of 30 s


@pytest.fixture(scope="module")
def faults(cluster):
    """The cluster with a second training host, the zombie automation, leases kept on the server's disk, and prepare done."""
    stack = cluster.stack
    if any(stack.server_env.get(k) != v for k, v in LEASES_SURVIVE_RESTART.items()):
        stack.server_env.update(LEASES_SURVIVE_RESTART)  # what README's "Running a cluster" tells operators to set
        cluster.restart_server()
    if "train-2" not in cluster.hosts:
        cluster.add_host("train-2")
        cluster.start_worker("train-2", GPU_POOL)
    done = cluster.run("cpu", [PYTHON, "-m", "flows.automations", "--within", str(ZOMBIE_WITHIN_S)])
    assert done.returncode == 0, done.stdout + done.stderr
    run_data_stages(cluster)
    yield cluster
    # The tests after these share the cluster: their runs send no heartbeats of 30 s, and a pipeline run waiting on its
    # stages' runs may stay silent for minutes, which a 60 s window would mark Crashed.
    cluster.run("cpu", [PYTHON, "-m", "flows.automations", "--within", "86400"])
    for host in ("train-1", "train-2"):  # a test killed one: give it its worker back for the tests after these
        if f"{host}-worker" in stack.procs and stack.procs[f"{host}-worker"].poll() is not None:
            cluster.start_worker(host, GPU_POOL)


def logs_of(cluster, run_id) -> str:
    return "\n".join(cluster.stack.run_logs(run_id, limit=200))


def wait_pushed(cluster, fp_of, at_least: int, timeout: float = 240, detail=None) -> tuple[str, int]:
    """Wait until a training has pushed last/ at step >= at_least; fp_of() names its output (None: not known yet)."""
    found = {}

    def pushed():
        fp = fp_of()
        if fp and (step := pushed_step(cluster, "pretrain", fp)) >= at_least:
            found.update(fp=fp, step=step)
            return True

    wait_until(f"a training to push last/ at step >= {at_least}", pushed, timeout=timeout, interval=0.3, detail=detail)
    return found["fp"], found["step"]


def uploads(cluster, fp: str) -> set[str]:
    """The writers' upload folders under pretrain/<fp>/ in the bucket."""
    return {k.split("/")[2] for k in bucket(cluster, f"pretrain/{fp}/") if k.split("/")[2].startswith("upload-")}


def assert_committed_once(cluster, fp: str, steps: int, leftovers: frozenset = frozenset()) -> dict:
    """The output is complete in the bucket, written by one writer, every logged step once, no lease left."""
    manifest = read_json(cluster, f"pretrain/{fp}/manifest.json")
    found = uploads(cluster, fp)
    assert found == {manifest["dir"], *leftovers}, f"one writer's upload, the one the manifest names: {sorted(found)}"
    assert manifest["counts"]["steps"] == steps
    assert metrics_steps(cluster, "pretrain", fp) == list(range(4, steps + 1, 4)), "a logged step lost or repeated"
    assert not [k for k in bucket(cluster, f"pretrain/{fp}/") if k.split("/")[2].startswith(("last", "best"))], \
        "the training's checkpoints in progress are removed once the output is committed"
    wait_until("the leases to be released", lambda: slots(cluster, f"homer-output-pretrain-{fp}") == 0 == slots(cluster, "gpu"),
               timeout=30)
    return manifest


# ---- d. two hosts start the same stage at the same time -------------------------------------------

def test_d_two_hosts_start_the_same_training_at_once_one_trains_the_other_reuses_it(faults):
    cluster = faults
    for host in ("starter-1", "starter-2"):
        if host not in cluster.hosts:
            cluster.add_host(host)
    procs = {host: homer_stage(cluster, host, seed=4, max_steps=40, log="d") for host in ("starter-1", "starter-2")}
    for host, proc in procs.items():
        try:
            proc.wait(timeout=300)
        except Exception:
            pytest.fail(f"`homer stage pretrain` in {host} did not finish\n{cluster.log_tail(f'{host}-d')}", pytrace=False)
    outputs = {host: (cluster.logs / f"{host}-d.log").read_text(errors="replace") for host in procs}
    for host, proc in procs.items():
        assert proc.returncode == 0, outputs[host][-3000:]

    trained = [host for host, text in outputs.items() if "training pretrain into" in text]
    assert len(trained) == 1, f"exactly one host trains: {trained}"
    (waited,) = set(procs) - set(trained)
    assert "taking the lease 'homer-output-pretrain-" in outputs[waited] and "reusing it" in outputs[waited], outputs[waited][-3000:]
    fp = training_fp(outputs[trained[0]])
    assert fp and training_fp(outputs[waited]) == fp
    manifest = assert_committed_once(cluster, fp, steps=40)
    assert not manifest["counts"]["resumed_from_step"]


# ---- e. a host dies holding the gpu slot -----------------------------------------------------------

def test_e_a_host_dies_holding_the_gpu_slot_the_slot_comes_free_and_the_next_run_proceeds(faults):
    cluster = faults
    for host in ("holder", "next"):
        if host not in cluster.hosts:
            cluster.add_host(host)
    homer_stage(cluster, "holder", seed=5, max_steps=2000, log="e")
    fp, _ = wait_pushed(cluster, lambda: training_fp((cluster.logs / "holder-e.log").read_text(errors="replace")), 4,
                        detail=lambda: cluster.log_tail("holder-e"))
    assert slots(cluster, "gpu") == 1
    cluster.kill_host("holder")
    killed_at = time.monotonic()
    assert slots(cluster, "gpu") == 1, "the dead host's slot is still taken"

    following = homer_stage(cluster, "next", seed=6, max_steps=8, log="e")
    following.wait(timeout=300)
    text = (cluster.logs / "next-e.log").read_text(errors="replace")
    assert following.returncode == 0, text[-3000:]
    waited = time.monotonic() - killed_at
    assert "taking the 'gpu' concurrency slot" in text
    assert waited < 60 + 15 + 60, f"the slot came free {waited:.0f} s after the kill (lease 60 s, reaper every 15 s)"
    assert_committed_once(cluster, training_fp(text), steps=8)
    assert pushed_step(cluster, "pretrain", fp) >= 4, "the dead host's last/ stays in the bucket for a re-run"


# ---- a. a training host dies mid-epoch ------------------------------------------------------------

def test_a_a_training_host_dies_mid_run_the_retry_resumes_on_the_other_host_bit_identically(faults, tmp_path, monkeypatch):
    cluster, stack = faults, faults.stack
    parameters = pretrain_parameters(seed=7, max_steps=120)
    run_id = trigger(cluster, "pretrain/pretrain", parameters)
    fp, _ = wait_pushed(cluster, lambda: training_fp(logs_of(cluster, run_id)), 12, detail=lambda: stack.describe(run_id))
    victim = host_of(cluster, run_id)
    assert victim in ("train-1", "train-2"), victim
    cluster.kill_host(victim)
    killed_at = pushed_step(cluster, "pretrain", fp)
    assert not bucket(cluster, f"pretrain/{fp}/manifest.json"), "nothing half-written reads as complete"

    # The server hears no more heartbeats: the automation marks the run Crashed.
    run = wait_until("the zombie automation to mark the run Crashed", lambda: (r := stack.flow_run(run_id))["state_type"] in FINAL and r,
                     timeout=ZOMBIE_WITHIN_S + 150, interval=2, detail=lambda: stack.describe(run_id))
    assert run["state_type"] == "CRASHED", stack.describe(run_id)
    stack.cli("flow-run", "retry", str(run_id))  # what **Retry** in the UI does
    stack.wait_final(run_id, timeout=300)
    survivor = {"train-1": "train-2", "train-2": "train-1"}[victim]
    assert host_of(cluster, run_id) == survivor
    text = logs_of(cluster, run_id)
    assert "resuming pretrain from" in text, text[-3000:]
    manifest = assert_committed_once(cluster, fp, steps=120)
    assert manifest["counts"]["resumed_from_step"] == killed_at > 0

    # The same training, uninterrupted, here (one thread, on the CPU): the same weights, bit for bit.
    reference = train_here(cluster, parameters, manifest, tmp_path, monkeypatch)
    from safetensors.torch import load_file

    committed = tmp_path / "committed.safetensors"
    cluster.s3().download_file("homer-cluster", f"{cluster.data_root.split('/', 3)[3]}/pretrain/{fp}/{manifest['dir']}/last/model.safetensors",
                               str(committed))
    a, b = load_file(committed), load_file(reference / "last" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "the resumed weights differ from an uninterrupted run's"


def train_here(cluster, parameters: dict, manifest: dict, tmp_path, monkeypatch):
    """Train the run's config, uninterrupted, in this process on the prepare output it used (read from the bucket)."""
    from flows.config import PretrainConfig
    from model.data.vocab import Vocab
    from model.store.remote import materialize, parse_root
    from model.training.loop import train

    for key, value in cluster.host_env("cpu").items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("HOMER_CACHE_DIR", str(tmp_path / "cache"))
    prepare_fp = manifest["inputs"]["prepare"]["fingerprint"]
    prepare = materialize(parse_root(cluster.data_root), "prepare", prepare_fp)
    config = PretrainConfig.model_validate(parameters["config"])
    out = tmp_path / "reference"
    train(model_config=config.model, train_config=config.train, shards_dir=prepare / "shards" / "wikipedia", out_dir=out,
          vocab=Vocab.load(prepare / "vocab.json"))
    return out


# ---- c. the Prefect server restarts during a run --------------------------------------------------

def test_c_the_server_restarts_mid_run_and_the_run_finishes_once(faults):
    cluster, stack = faults, faults.stack
    parameters = pretrain_parameters(seed=8, max_steps=320)
    deployment = stack.deployment_id("pretrain/pretrain")
    # The zombie window must outlast a restart (no heartbeat reaches a server that is down): README's 600 s.
    done = cluster.run("cpu", [PYTHON, "-m", "flows.automations", "--within", "600"])
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = trigger(cluster, "pretrain/pretrain", parameters)
    fp, _ = wait_pushed(cluster, lambda: training_fp(logs_of(cluster, run_id)), 8, detail=lambda: stack.describe(run_id))
    cluster.restart_server()
    assert stack.flow_run(run_id)["state_type"] == "RUNNING", "the run was lost in the restart"
    run = stack.wait_final(run_id, timeout=400)
    assert run["run_count"] == 1, "the flow run ran twice"
    ours = [r for r in stack.rest("POST", "/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [str(deployment)]}}})
            if r["parameters"].get("config", {}).get("train", {}).get("seed") == 8]
    assert [r["id"] for r in ours] == [str(run_id)], "one flow run, no duplicate"
    task_runs = stack.rest("POST", "/task_runs/filter", json={"task_runs": {"flow_run_id": {"any_": [str(run_id)]}}})
    trainings = [t for t in task_runs if t["name"].startswith("pretrain")]
    assert [(t["state_type"], t["run_count"]) for t in trainings] == [("COMPLETED", 1)], trainings
    manifest = assert_committed_once(cluster, fp, steps=320)
    assert not manifest["counts"]["resumed_from_step"], "the training went through the restart without starting again"


# ---- b. the storage link goes down while a stage writes its output --------------------------------

def test_b_the_storage_link_goes_down_while_a_training_commits_and_the_retry_completes_it(faults):
    cluster, stack = faults, faults.stack
    trainers = ("train-1", "train-2")
    run_id = None
    try:
        for host in trainers:  # uploads take seconds, so the link can go down in the middle of one
            slow_link(cluster, host, "256kbit")
        run_id = trigger(cluster, "pretrain/pretrain", pretrain_parameters(seed=9, max_steps=8))
        found = {}

        def committing():
            if (fp := training_fp(logs_of(cluster, run_id))) and uploads(cluster, fp):
                return found.setdefault("fp", fp)

        fp = wait_until("the training to start uploading its output", committing, timeout=300, interval=0.2,
                        detail=lambda: stack.describe(run_id))
        cluster.link("storage", up=False)
        writer = host_of(cluster, run_id)
        stack.wait_final(run_id, expect="FAILED", timeout=400)
    finally:
        cluster.link("storage", up=True)
        for host in trainers:
            slow_link(cluster, host, None)
    assert f"pretrain/{fp}/manifest.json" not in bucket(cluster, f"pretrain/{fp}/"), "a half-written output reads as complete"
    assert not [k for k in bucket(cluster, "pretrain/latest.d/") if k.endswith(fp)], "latest moved to a half-written output"
    assert not list(cluster.hosts[writer].home.glob(f".cache/recurrent-homer/*/pretrain/{fp}/manifest.json")), \
        "the writer's own mirror reads as complete"
    partial = uploads(cluster, fp)
    assert partial, "the cut upload left its folder"

    stack.cli("flow-run", "retry", str(run_id))
    stack.wait_final(run_id, timeout=300)
    manifest = assert_committed_once(cluster, fp, steps=8, leftovers=frozenset(partial))
    assert latest_fp(cluster) == fp

    gc = [f"{VENV_BIN}/homer", "gc", "--grace-hours", "0"]
    listed = cluster.run("cpu", gc).stdout
    for folder in partial:
        assert f"pretrain/{fp}/{folder}: abandoned upload" in listed, listed
    removed = cluster.run("cpu", [*gc, "--remove"])
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert uploads(cluster, fp) == {manifest["dir"]}
    assert read_json(cluster, f"pretrain/{fp}/manifest.json") == manifest and latest_fp(cluster) == fp


def latest_fp(cluster) -> str:
    """The fingerprint of pretrain's newest latest.d entry (the bucket's `latest`)."""
    return max(k.split("/")[-1] for k in bucket(cluster, "pretrain/latest.d/")).split("-", 1)[1]
