"""The pipeline across hosts of their own (tests/cluster/conftest.py): data stages on the CPU host,
training on the training host, the server on PostgreSQL, the artifacts only in the bucket, and a
fifth, empty host generating from what the bucket holds.

    .venv/bin/python -m pytest tests/cluster/test_hosts.py -q      # as root
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.cluster.conftest import BUCKET, PYTHON, SERVER_PORT, TINY_PRETRAIN, VENV_BIN, manifests, run_data_stages
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


def test_stages_run_on_their_hosts_and_an_empty_host_generates_from_the_bucket(cluster):
    stack, hosts = cluster.stack, cluster.hosts
    runs = run_data_stages(cluster)
    runs["pretrain"] = stack.trigger("pretrain/pretrain", {"config": TINY_PRETRAIN})
    stack.wait_final(runs["pretrain"], timeout=300)

    objects = cluster.bucket_objects()
    for stage, run_id in runs.items():  # each ran on its pool's host: its output was made in that host's mirror
        host, pool = ("train-1", GPU_POOL) if stage == "pretrain" else ("cpu", POOL)
        assert stack.flow_run(run_id)["work_pool_name"] == pool, stage
        (fp,) = manifests(objects, stage)
        assert mirrored(hosts[host], stage, fp), stage
        if stage != "prepare":  # (train-1 downloads prepare's output to train on it)
            assert not mirrored(hosts["train-1" if host == "cpu" else "cpu"], stage, fp), stage
    (pretrain,) = manifests(objects, "pretrain").values()
    assert pretrain["counts"]["world_size"] == 1 and pretrain["hosts"] == [hosts["train-1"].hostname]
    for host in ("cpu", "train-1"):  # a worker's working directory stays empty: everything went to the bucket
        assert list(hosts[host].workdir.iterdir()) == []

    client = cluster.add_host("client") if "client" not in hosts else hosts["client"]
    env = {k: v for k, v in cluster.host_env("client").items() if not k.startswith("PREFECT_API")}  # no server needed
    done = cluster.run("client", [f"{VENV_BIN}/homer", "generate", "--checkpoint", "latest", "--length", "40", "-n", "2",
                                  "--json"], env=env, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    samples = json.loads(done.stdout)
    assert len(samples) == 2 and all(len(s) >= 40 for s in samples), samples
    (fp,) = manifests(objects, "pretrain")
    assert list(client.home.glob(f".cache/recurrent-homer/*/pretrain/{fp}/best/*")), "generate did not read the bucket's pretrain"
