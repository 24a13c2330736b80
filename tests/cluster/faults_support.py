"""Helpers of the fault tests (tests/cluster/test_faults.py) on top of the `cluster` fixture (conftest.py).

- `RUN_ENV`: what each training run of the fault tests gets as the `env` job variable (or in its
  environment): the `gpu` slot on this CPU machine, a heartbeat every 30 s (the least Prefect allows),
  and an S3 client that gives up within seconds when the store cannot be reached.
- `trigger(cluster, deployment, parameters)`: a flow run of a deployment with RUN_ENV.
- `homer_stage(cluster, host, seed, ...)`: `homer stage pretrain` run in a host (no worker): a stage that
  a host starts by itself.
- `host_of(cluster, run_id)`: the host a flow run ran in (its infrastructure pid names the host).
- `bucket`, `read_json`, `pushed_step`, `slots`: what the bucket and the server say.
- `LEASES_SURVIVE_RESTART`: the server setting that keeps concurrency leases across a server restart.
"""

from __future__ import annotations

import json
import re

from tests.cluster.conftest import BUCKET, VENV_BIN

# With Prefect's default (in the server's memory) a restarted server forgets every lease: the slots they
# hold are never freed, and each holder's renewal fails. On disk (the server host's PREFECT_HOME) they survive.
LEASES_SURVIVE_RESTART = {"PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem"}

RUN_ENV = {
    "HOMER_GPU_LIMIT": "always",  # take the `gpu` slot on a CPU machine too
    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
    # a store out of reach fails a call within seconds, not after minutes of retries
    "AWS_MAX_ATTEMPTS": "2", "AWS_RETRY_MODE": "standard",
    "FSSPEC_S3": json.dumps({"config_kwargs": {"connect_timeout": 3, "read_timeout": 15}}),
}

TINY_MODEL = {"embedding_dim": 16, "hidden_sizes": [32], "dropout": 0.0}


def tiny_train(seed: int, max_steps: int, **more) -> dict:
    """A tiny training: `max_steps` steps, last/ every 4 steps (pushed to the bucket), one thread, its own seed."""
    return {"epochs": 50, "max_steps": max_steps, "batch_size": 16, "checkpoint_every_steps": 4, "log_every_steps": 4,
            "early_stopping_patience": None, "max_val_windows": 16, "num_threads": 1, "device": "cpu", "seed": seed, **more}


def pretrain_parameters(seed: int, max_steps: int, **more) -> dict:
    return {"config": {"model": TINY_MODEL, "train": tiny_train(seed, max_steps, **more)}, "start_from": "config"}


def trigger(cluster, deployment: str, parameters: dict):
    stack = cluster.stack
    run = stack.client.create_flow_run_from_deployment(stack.deployment_id(deployment), parameters=parameters,
                                                      job_variables={"env": RUN_ENV})
    return run.id


def homer_stage(cluster, host: str, seed: int, max_steps: int, log: str):
    """`homer stage pretrain` (the tiny recipe) started in `host` by itself, against the cluster's server and bucket."""
    sets = [f"pretrain.model.{k}={json.dumps(v)}" for k, v in TINY_MODEL.items()]
    sets += [f"pretrain.train.{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in tiny_train(seed, max_steps).items()]
    argv = [f"{VENV_BIN}/homer", "stage", "pretrain", "--profile", "default", *[a for s in sets for a in ("--set", s)]]
    return cluster.spawn(host, argv, env=cluster.host_env(host, **RUN_ENV), log=log)


def host_of(cluster, run_id) -> str:
    """The host a flow run ran (or last ran) in: its infrastructure pid `<hostname>:<pid>`, else the host whose
    HOME its newest log lines name (a training logs where it trains: `training pretrain into <HOME>/.cache/...`).

    Not the worker that logged "submitting": two workers of a pool both log that when they race for a run,
    and the server lets only one of them through.
    """
    pid = str(cluster.stack.flow_run(run_id).get("infrastructure_pid") or "")
    names = [name for name, host in cluster.hosts.items() if pid.startswith(f"{host.hostname}:")]
    if names:
        return names[0]
    newest_first = cluster.stack.rest("POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [str(run_id)]}},
                                                                    "sort": "TIMESTAMP_DESC", "limit": 200})
    for entry in newest_first:
        for name, host in cluster.hosts.items():
            if f"{host.home}/" in entry["message"]:
                return name
    return ""


def _root(cluster) -> str:
    return cluster.data_root.split("/", 3)[3]


def bucket(cluster, under: str = "") -> list[str]:
    """Object keys under the data root (relative to it), starting with `under`."""
    client, prefix = cluster.s3(), _root(cluster) + "/"
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + under)
    return [o["Key"][len(prefix):] for page in pages for o in page.get("Contents", [])]


def read_json(cluster, key: str) -> dict:
    return json.loads(cluster.s3().get_object(Bucket=BUCKET, Key=f"{_root(cluster)}/{key}")["Body"].read())


def pushed_step(cluster, stage: str, fp: str) -> int:
    """The step of the last/ checkpoint a training pushed to the bucket (0: none yet)."""
    try:
        return read_json(cluster, f"{stage}/{fp}/last.json")["step"]
    except Exception:  # not there yet
        return 0


def training_fp(text: str, stage: str = "pretrain") -> str | None:
    """The fingerprint in a run's `taking the lease 'homer-output-<stage>-<fp>'` line."""
    match = re.search(rf"homer-output-{stage}-([0-9a-f]{{16}})", text)
    return match.group(1) if match else None


def slots(cluster, name: str) -> int:
    """Active slots of a global concurrency limit (0 when the limit does not exist)."""
    import httpx

    try:
        return cluster.stack.rest("GET", f"/v2/concurrency_limits/{name}")["active_slots"]
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 404:
            return 0
        raise


def metrics_steps(cluster, stage: str, fp: str) -> list[int]:
    """The steps of the `log` entries in a committed output's metrics.jsonl (from the bucket)."""
    manifest = read_json(cluster, f"{stage}/{fp}/manifest.json")
    body = cluster.s3().get_object(Bucket=BUCKET, Key=f"{_root(cluster)}/{stage}/{fp}/{manifest['dir']}/metrics.jsonl")["Body"].read()
    return [e["step"] for e in map(json.loads, body.decode().splitlines()) if e.get("kind") == "log"]


def slow_link(cluster, host: str, rate: str | None) -> None:
    """Limit what `host` sends to `rate` (tc's token bucket on its eth0, e.g. "256kbit"), so an upload takes seconds;
    None lifts the limit."""
    import subprocess

    netns = cluster.hosts[host].netns
    argv = (["tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "16kb", "latency", "2s"] if rate
            else ["tc", "qdisc", "del", "dev", "eth0", "root"])
    done = subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=30)
    if rate and done.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` in host {host} exited {done.returncode}: {done.stderr.strip()}")
