"""The pipeline across hosts of their own (tests/cluster/conftest.py): data stages on the CPU host,
training on the training host, the server on PostgreSQL, the artifacts only in the bucket, and a
fifth, empty host generating from what the bucket holds.

    .venv/bin/python -m pytest tests/cluster/test_hosts.py -q      # as root
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tasks.common import labelled_output
from tasks.stages import STAGES
from tests.cluster.conftest import BUCKET, PYTHON, SAMPLE_DATA, SERVER_PORT, TINY_PRETRAIN, VENV_BIN, manifests
from tests.e2e.conftest import GPU_POOL, POOL

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

PROBE = """import json, socket, sys
out = {}
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        out[target] = "open"
    except OSError as exc:
        out[target] = type(exc).__name__
print(json.dumps(out))
"""


def probe(cluster, host: str, *targets: str) -> dict[str, str]:
    done = cluster.run(host, [PYTHON, "-c", PROBE, *targets], env={"PATH": "/usr/bin:/bin"}, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def mirrored(host, stage: str, fp: str) -> bool:
    """Whether the host's own mirror of the bucket (in its HOME's cache) holds that output."""
    return bool(list(host.home.glob(f".cache/recurrent-homer/*/{stage}/{fp}/manifest.json")))


def test_a_host_reaches_the_others_by_address_only(cluster):
    server = cluster.hosts["server"].address
    loopback, by_address = f"127.0.0.1:{SERVER_PORT}", f"{server}:{SERVER_PORT}"
    assert probe(cluster, "server", loopback) == {loopback: "open"}  # the server listens on its own loopback too ...
    for host in ("cpu", "train-1"):  # ... which no other host reaches: only its address
        assert probe(cluster, host, loopback, by_address) == {loopback: "ConnectionRefusedError", by_address: "open"}
        env = cluster.host_env(host)
        assert not [k for k, v in env.items() if "127.0.0.1" in v or "localhost" in v], env
        assert env["PREFECT_API_URL"].startswith(f"http://{server}:") and env["HOMER_DATA_DIR"].startswith(f"s3://{BUCKET}/")
    names = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    assert cluster.run("cpu", ["hostname"]).stdout.strip() == cluster.hosts["cpu"].hostname != names


TINY_FINETUNE = {"train": {"epochs": 1, "max_steps": 8, "batch_size": 16, "checkpoint_every_steps": 4, "log_every_steps": 4,
                            "early_stopping_patience": None, "max_val_windows": 32, "device": "cpu"}}


def test_the_pipeline_runs_its_stages_on_their_hosts_and_an_empty_host_generates_from_the_bucket(cluster):
    stack, hosts = cluster.stack, cluster.hosts
    config = {"profile": "sample", "wikipedia": SAMPLE_DATA["wikipedia"], "simpsons": SAMPLE_DATA["simpsons"],
              "prepare": SAMPLE_DATA["prepare"], "pretrain": TINY_PRETRAIN, "finetune": TINY_FINETUNE,
              "report": {"temperatures": [1.0], "length": 40, "num_samples": 1}}
    pipeline = stack.trigger("homer-pipeline/sample", {"config": config, "stages_on": "pools"})
    stack.wait_final(pipeline, timeout=900)
    assert stack.flow_run(pipeline)["work_pool_name"] == POOL

    objects = cluster.bucket_objects()
    trainers = [name for name in ("train-1", "train-2") if name in hosts]  # the fault tests add a second training host
    for stage in ("ingest-wikipedia", "ingest-simpsons", "prepare", "pretrain", "finetune", "report"):
        runs_on, pool = (trainers, GPU_POOL) if stage in ("pretrain", "finetune") else (["cpu"], POOL)
        children = [run for run in stack.rest("POST", "/flow_runs/filter", json={
            "deployments": {"id": {"any_": [str(stack.deployment_id(f"{stage}/{stage}"))]}}}) if run["parent_task_run_id"]]
        assert children and all(run["work_pool_name"] == pool and run["state_type"] == "COMPLETED" for run in children), stage
        fps = manifests(objects, stage)
        assert fps, stage
        assert any(mirrored(hosts[host], stage, fp) for host in runs_on for fp in fps), stage  # made in its pool's host's mirror
    # each stage took its inputs from the outputs its upstream runs labelled themselves with, not from `latest`
    own_tasks = [t["id"] for t in stack.rest("POST", "/task_runs/filter", json={"flow_runs": {"id": {"any_": [str(pipeline)]}}})]
    stage_of = {str(stack.deployment_id(f"{stage}/{stage}")): stage for stage in STAGES}
    own = {stage_of[run["deployment_id"]]: run for run in stack.rest("POST", "/flow_runs/filter", json={
        "flow_runs": {"parent_task_run_id": {"any_": own_tasks}}})}
    assert set(own) == set(STAGES), sorted(own)
    made = {stage: labelled_output(run["labels"], stage) for stage, run in own.items()}
    assert all(fp in manifests(objects, stage) for stage, fp in made.items()), made
    for stage, run in own.items():
        for param, upstream in STAGES[stage].inputs.items():
            assert run["parameters"][param] == made[upstream], (stage, param, run["parameters"], made)
    pretrain = manifests(objects, "pretrain")[newest(objects, "pretrain")]  # the pipeline's: the latest right after it
    assert pretrain["counts"]["world_size"] == 1 and pretrain["hosts"] in ([hosts[t].hostname] for t in trainers)
    for host in ("cpu", "train-1"):  # a worker's working directory stays empty: everything went to the bucket
        assert list(hosts[host].workdir.iterdir()) == []

    client = cluster.add_host("client") if "client" not in hosts else hosts["client"]
    env = {k: v for k, v in cluster.host_env("client").items() if not k.startswith("PREFECT_API")}  # no server needed
    done = cluster.run("client", [f"{VENV_BIN}/homer", "generate", "--checkpoint", "latest", "--length", "40", "-n", "2",
                                  "--json"], env=env, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    samples = json.loads(done.stdout)
    assert len(samples) == 2 and all(len(s) >= 40 for s in samples), samples
    fp = newest(objects, "finetune")  # `latest`: the newest fine-tuned model
    assert list(client.home.glob(f".cache/recurrent-homer/*/finetune/{fp}/best/*")), "generate did not read the bucket's finetune"


def newest(objects: dict[str, bytes], stage: str) -> str:
    """The fingerprint the stage's `latest` names: its newest latest.d/<stamp>-<fp> entry."""
    entries = sorted(key.rsplit("/", 1)[1] for key in objects if key.startswith(f"{stage}/latest.d/"))
    return entries[-1].split("-", 1)[1]
