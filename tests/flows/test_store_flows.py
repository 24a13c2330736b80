"""The pipeline with its artifact root in an object store: a real S3 API (moto's server on a loopback port).

The stages work on a local mirror in HOMER_CACHE_DIR and commit to the bucket (files, then the
manifest, create-only); another machine, here another empty cache and working directory, reads
the outputs, resumes a killed training and samples from the latest model, given only the URL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from safetensors.torch import load_file

from flows.config import load_config
from tests.flows.test_train_flows import TINY, task_states

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
STAGES = {"ingest-wikipedia", "ingest-simpsons", "prepare", "pretrain", "finetune", "report"}


@pytest.fixture
def bucket_root(s3_server, tmp_path, monkeypatch) -> str:
    """HOMER_DATA_DIR=s3://<bucket>/<fresh prefix>, a fresh HOMER_CACHE_DIR, and an empty working directory."""
    root = f"s3://{s3_server.bucket}/{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("HOMER_DATA_DIR", root)
    monkeypatch.setenv("HOMER_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return root


def bucket_keys(s3_server, root: str) -> list[str]:
    import boto3

    prefix = root.split("/", 3)[3] + "/"
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket, Prefix=prefix)
    return [o["Key"][len(prefix):] for page in pages for o in page.get("Contents", [])]


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def test_the_sample_pipeline_runs_in_a_bucket_and_another_machine_samples_from_it(s3_server, bucket_root, tmp_path):
    from flows.pipeline import homer_pipeline

    cfg = load_config("sample", None, TINY)
    state = homer_pipeline(cfg, return_state=True)
    refs = state.result()
    assert set(refs) == STAGES
    for stage, ref in refs.items():  # refs name the bucket, valid on every machine
        assert ref.path == f"{bucket_root}/{stage}/{ref.fingerprint}", ref
    keys = bucket_keys(s3_server, bucket_root)
    for stage, ref in refs.items():
        assert f"{stage}/{ref.fingerprint}/manifest.json" in keys
        assert any(k.startswith(f"{stage}/latest.d/") and k.endswith(ref.fingerprint) for k in keys), stage
    assert files_under(tmp_path / "work") == [], "nothing may be written outside the cache and temp"
    assert not (tmp_path / "work" / "data").exists()

    again = homer_pipeline(cfg, return_state=True)
    assert again.result() == refs
    assert set(task_states(again.state_details.flow_run_id).values()) == {"Cached"}
    assert_secret_nowhere(s3_server, bucket_root, tmp_path / "cache", [state.state_details.flow_run_id, again.state_details.flow_run_id])

    # Another machine: an empty working directory and cache, only the root's URL.
    other = tmp_path / "other"
    other.mkdir()
    env = {**os.environ, "HOMER_CACHE_DIR": str(other / "cache"), "HOMER_DATA_DIR": ""}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "generate", "--data-dir", bucket_root, "--checkpoint", "latest",
                           "--length", "30"], cwd=other, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "--- sample 1" in done.stdout
    assert refs["finetune"].fingerprint in done.stdout + done.stderr  # it says which output it used
    assert [p.name for p in other.iterdir()] == ["cache"]
    assert s3_server.secret not in done.stdout + done.stderr

    def homer(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", *args, "--data-dir", bucket_root], cwd=other, env=env,
                              capture_output=True, text=True, timeout=300)

    verified = homer("verify")
    assert verified.returncode == 0 and verified.stdout.count("ok ") == 6, verified.stdout + verified.stderr
    collected = homer("gc")
    assert collected.returncode == 0 and collected.stdout.strip().endswith("; run `homer gc --remove` to delete them")
    assert "/pretrain/" not in collected.stdout  # the training's pushed checkpoints left the store with its commit
    # A shard damaged in the bucket (same size, other bytes) is found and named, with the stage that remakes it.
    import boto3

    prefix = bucket_root.split("/", 3)[3] + "/"
    [shard] = [k for k in bucket_keys(s3_server, bucket_root) if k.startswith("prepare/") and k.endswith("train-00000-of-00001.parquet")
               and "/shards/simpsons/" in k]
    client = boto3.client("s3")
    body = client.get_object(Bucket=s3_server.bucket, Key=prefix + shard)["Body"].read()
    client.put_object(Bucket=s3_server.bucket, Key=prefix + shard, Body=bytes(len(body)))
    broken = homer("verify", "prepare")
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "damaged" in broken.stdout and "train-00000-of-00001.parquet" in broken.stdout and "homer stage prepare" in broken.stdout


def assert_secret_nowhere(s3_server, root: str, cache: Path, flow_run_ids: list) -> None:
    """The bucket's secret key is in no object of the root, no file of the cache, no log line and no run parameter."""
    import boto3
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId, LogFilter, LogFilterFlowRunId

    secret = s3_server.secret.encode()
    client = boto3.client("s3")
    prefix = root.split("/", 3)[3] + "/"
    for key in bucket_keys(s3_server, root):
        body = client.get_object(Bucket=s3_server.bucket, Key=prefix + key)["Body"].read()
        assert secret not in body, f"the secret is in s3 object {key}"
    for file in cache.rglob("*"):
        if file.is_file():
            assert secret not in file.read_bytes(), f"the secret is in {file}"
    with get_client(sync_client=True) as prefect:
        children = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=flow_run_ids)))
        runs = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids))) + children
        logs = prefect.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs])))
    assert len(runs) >= 2 * 6 and logs, "expected the pipeline runs, their subflows and their logs"
    for run in runs:
        assert s3_server.secret not in json.dumps(run.parameters, default=str), f"the secret is in run {run.name}'s parameters"
    assert not [line.message for line in logs if s3_server.secret in line.message]


def _pretrain(bucket: str, cache: Path, sets: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HOMER_DATA_DIR": bucket, "HOMER_CACHE_DIR": str(cache)}
    from prefect.settings import PREFECT_API_URL

    env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    cmd = [sys.executable, "-m", "flows.cli", "stage", "pretrain", "--profile", "sample", *(a for s in sets for a in ("--set", s))]
    return subprocess.Popen(cmd, cwd=cache.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_a_training_killed_on_one_machine_resumes_on_another_from_the_bucket_bit_identically(s3_server, bucket_root, tmp_path):
    from flows.pipeline import homer_pipeline

    homer_pipeline(load_config("sample", None, TINY))  # the data stages, in the bucket
    sets = TINY[:3] + ["pretrain.train.max_steps=120", "pretrain.train.checkpoint_every_steps=5", "pretrain.train.num_threads=1",
                       "pretrain.train.log_every_steps=5", "pretrain.train.batch_size=8", "pretrain.train.max_val_windows=16"]
    reference_root = f"s3://{s3_server.bucket}/{uuid.uuid4().hex[:8]}"
    machines = {name: tmp_path / name / "cache" for name in ("one", "two", "reference")}
    for cache in machines.values():
        cache.parent.mkdir()
    # The reference: the same stage, uninterrupted, in another root (which needs its own data stages).
    reference_env = {"HOMER_DATA_DIR": reference_root, "HOMER_CACHE_DIR": str(machines["reference"])}
    with pytest.MonkeyPatch.context() as env:
        for key, value in reference_env.items():
            env.setenv(key, value)
        homer_pipeline(load_config("sample", None, TINY))
    reference = _pretrain(reference_root, machines["reference"], sets)

    victim = _pretrain(bucket_root, machines["one"], sets)
    try:
        deadline, step = time.monotonic() + 180, 0
        while time.monotonic() < deadline and victim.poll() is None:
            pointers = [k for k in bucket_keys(s3_server, bucket_root) if k.startswith("pretrain/") and k.endswith("/last.json")]
            if pointers:
                import boto3

                key = f"{bucket_root.split('/', 3)[3]}/{pointers[0]}"
                step = json.loads(boto3.client("s3").get_object(Bucket=s3_server.bucket, Key=key)["Body"].read())["step"]
                if step >= 20:
                    break
            time.sleep(0.2)
        assert step >= 20 and victim.poll() is None, "the training never pushed last/ mid-run"
        os.killpg(victim.pid, signal.SIGKILL)
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()

    resumed = _pretrain(bucket_root, machines["two"], sets)  # an empty disk: last/ comes from the bucket
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]
    ref_out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_out[-3000:]
    [done] = list(machines["two"].glob("*/pretrain/*/manifest.json"))
    manifest = json.loads(done.read_text())
    assert manifest["counts"]["resumed_from_step"] >= step and manifest["counts"]["steps"] == 120
    # the same fingerprint (same recipe, same data) in the reference root
    [ref_done] = list(machines["reference"].glob(f"*/pretrain/{done.parent.name}/manifest.json"))
    a, b = load_file(done.parent / "last" / "model.safetensors"), load_file(ref_done.parent / "last" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "the resumed weights differ from the reference"
