"""Scaling out, end to end: a server on PostgreSQL with an auth string, two workers on the two pools,
artifacts in a bucket.

Each worker is a "machine" of its own: its own empty working directory, HOME, PREFECT_HOME
and cache; the two share only the bucket (moto's S3 server on a loopback port, reached
through AWS_ENDPOINT_URL). The data stages run on the CPU worker (homer-pool), training on
the GPU worker (homer-gpu); a stage re-triggered through the API then reads the bucket's
latest. Outputs are written under a Prefect lease per output (HOMER_OUTPUT_LOCK=auto with a
real server and a root in a store). The server keeps its state in a fresh database on the
machine's PostgreSQL, as a cluster's server does (the test skips, saying why, without one).

    python -m pytest tests/e2e/test_scale_out.py -q
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import uuid
from pathlib import Path

import pytest

from flows.config import PROFILES
from tests.e2e.conftest import GPU_POOL, POOL, Stack, free_port, stop_pids

pytestmark = [pytest.mark.e2e, pytest.mark.cluster, pytest.mark.slow]

SAMPLE = PROFILES["sample"]
TINY_TRAIN = {"model": {"embedding_dim": 16, "hidden_sizes": [32], "dropout": 0.0},
              "train": {"epochs": 1, "max_steps": 12, "batch_size": 16, "checkpoint_every_steps": 4, "log_every_steps": 4,
                        "early_stopping_patience": None, "max_val_windows": 32}}
BUCKET = "homer-e2e"
SECRET = f"homer-e2e-secret-{secrets.token_hex(8)}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, postgres_url):
    from moto.server import ThreadedMotoServer

    root = tmp_path_factory.mktemp("scale-out")
    port = free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    s3.start()
    stack = Stack(root, database_url=postgres_url)
    aws = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "homer-e2e-key", "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(root / "no-aws-config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(root / "no-aws-credentials"), "AWS_EC2_METADATA_DISABLED": "true"}
    data_root = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
    stack.env.update(aws, HOMER_DATA_DIR=data_root, HOMER_OUTPUT_LOCK="auto")
    machines = {}
    try:
        import boto3

        boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"], aws_access_key_id="homer-e2e-key", aws_secret_access_key=SECRET,
                     region_name="us-east-1").create_bucket(Bucket=BUCKET)
        stack.start_server()
        stack.provision()
        for name, pool in (("cpu-machine", POOL), ("gpu-machine", GPU_POOL)):
            home = root / name
            home.mkdir()
            env = {**stack.env, "HOME": str(home), "PREFECT_HOME": str(home / ".prefect"), "HOMER_E2E_MACHINE": name}
            env.pop("HOMER_CACHE_DIR", None)  # the default: ~/.cache/recurrent-homer of this machine's HOME
            stack.start_worker(name, pool, env=env, cwd=home)
            machines[name] = home
        yield stack, data_root, machines, aws
    finally:
        stack.close()
        leftovers = [pid for pid in _pids_with("HOMER_E2E_MACHINE=")]  # flow-run processes of the machines
        stop_pids(leftovers, grace=5)
        s3.stop()


def _pids_with(marker: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if any(v.startswith(marker.encode()) for v in (proc / "environ").read_bytes().split(b"\0")):
                    found.append(int(proc.name))
            except OSError:
                pass
    return [pid for pid in found if pid != os.getpid()]


def bucket_objects(aws: dict, root: str) -> dict[str, bytes]:
    import boto3

    client = boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"], aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    prefix = root.split("/", 3)[3] + "/"
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for o in page.get("Contents", [])]
    return {k[len(prefix):]: client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}


def manifest_of(objects: dict[str, bytes], stage: str, fp: str) -> dict:
    return json.loads(objects[f"{stage}/{fp}/manifest.json"])


def result_ref(stack: Stack, run_id) -> dict:
    """The StageRef a stage's flow run returned, from its output artifact (the store's URL)."""
    import re

    (artifact,) = [a for a in stack.artifacts(run_id) if (a.get("key") or "").endswith("-output") or
                   (a.get("key") or "").endswith("-checkpoint")]
    match = re.search(r"(s3://[^`\s)]+)", artifact["data"])
    assert match, artifact["data"]
    url = match.group(1).rstrip("/")
    if url.endswith("/best"):
        url = url[: -len("/best")]
    stage, fp = url.rsplit("/", 2)[-2:]
    return {"url": url, "stage": stage, "fingerprint": fp}


def worker_of(stack: Stack, run_id) -> str:
    run = stack.flow_run(run_id)
    return run.get("work_pool_name") or ""


def test_data_on_one_machine_training_on_the_other_sharing_only_the_bucket(cluster):
    stack, root, machines, aws = cluster
    runs = {}
    for stage, section in (("ingest-wikipedia", "wikipedia"), ("ingest-simpsons", "simpsons")):
        runs[stage] = stack.trigger(f"{stage}/{stage}", {"config": SAMPLE[section]})
    for stage in list(runs):
        stack.wait_final(runs[stage], timeout=180)
    runs["prepare"] = stack.trigger("prepare/prepare", {"config": SAMPLE["prepare"]})
    stack.wait_final(runs["prepare"], timeout=180)
    runs["pretrain"] = stack.trigger("pretrain/pretrain", {"config": TINY_TRAIN})
    stack.wait_final(runs["pretrain"], timeout=240)

    for stage, run_id in runs.items():
        expected = GPU_POOL if stage == "pretrain" else POOL
        assert worker_of(stack, run_id) == expected, (stage, stack.describe(run_id))
    objects = bucket_objects(aws, root)
    refs = {stage: result_ref(stack, run_id) for stage, run_id in runs.items()}
    for stage, ref in refs.items():
        assert ref["url"].startswith(root), ref
        assert f"{stage}/{ref['fingerprint']}/manifest.json" in objects, stage
    pretrain = manifest_of(objects, "pretrain", refs["pretrain"]["fingerprint"])
    assert pretrain["inputs"]["prepare"]["fingerprint"] == refs["prepare"]["fingerprint"]
    assert pretrain["inputs"]["prepare"]["path"] == refs["prepare"]["url"]  # refs name the bucket, not a machine

    cpu_cache, gpu_cache = (next(p.parent for p in (machines[m] / ".cache" / "recurrent-homer").glob("*/.homer-root"))
                            for m in ("cpu-machine", "gpu-machine"))  # the store's mirror (beside it: windows/)
    assert list(cpu_cache.glob("prepare/*/manifest.json")) and not list(cpu_cache.glob("pretrain/*"))
    assert list(gpu_cache.glob("pretrain/*/manifest.json"))  # trained there, from the prepare output it downloaded
    assert list(gpu_cache.glob(f"prepare/{refs['prepare']['fingerprint']}/manifest.json"))
    for home in machines.values():  # a machine's working directory holds nothing but its own HOME's dot-folders
        assert sorted(p.name for p in home.iterdir() if not p.name.startswith(".")) == [], sorted(home.iterdir())
    logs = "\n".join(line for run_id in runs.values() for line in stack.run_logs(run_id))
    assert "taking the lease 'homer-output-pretrain-" in logs  # the Prefect lease, not only a host lock
    for name, body in objects.items():
        assert SECRET.encode() not in body, f"the secret is in {name}"
    for log in stack.logs.glob("*.log"):
        assert SECRET not in log.read_text(errors="replace"), f"the secret is in {log}"

    # Re-triggered through the API with one field changed; the next stage then takes the bucket's latest.
    again = stack.trigger("prepare/prepare", {"config": {"seq_len": 50}})
    stack.wait_final(again, timeout=180)
    new_prepare = result_ref(stack, again)
    assert new_prepare["fingerprint"] != refs["prepare"]["fingerprint"]
    retrain = stack.trigger("pretrain/pretrain")  # no parameters: its latest config, on the latest prepare
    stack.wait_final(retrain, timeout=240)
    objects = bucket_objects(aws, root)
    manifest = manifest_of(objects, "pretrain", result_ref(stack, retrain)["fingerprint"])
    assert manifest["inputs"]["prepare"]["fingerprint"] == new_prepare["fingerprint"]
    # "like last time": the tiny model, not the published one
    assert {k: manifest["config"]["model"][k] for k in TINY_TRAIN["model"]} == TINY_TRAIN["model"]
