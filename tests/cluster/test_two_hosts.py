"""Pretraining across two hosts (train.nnodes=2, one process on each, gloo), against one process.

Each host runs the same stage (`homer stage pretrain`) with its own train.node_rank; torchrun
meets at train-1's address (a static rendezvous: rank 0, the writer, on node 0). train-2 trains
its share, commits nothing, and returns machine 0's output once it is in the bucket. With the
same global batch and dropout 0 the losses are those of one process, within float tolerance.

    .venv/bin/python -m pytest tests/cluster/test_two_hosts.py -q      # as root
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time

import pytest
import yaml

from model.training.distributed import torchrun_args
from model.training.loop import TrainConfig
from tests.cluster.conftest import TINY_PRETRAIN, VENV_BIN, manifests, run_data_stages

RDZV_PORT = 29400


def test_machines_meet_in_a_static_rendezvous_with_rank_0_on_machine_0():
    cfg = TrainConfig(batch_size=16, nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.5:29400")
    args = torchrun_args(cfg, "homer-abc")
    assert args[args.index("--rdzv-backend") + 1] == "static" and args[args.index("--node-rank") + 1] == "1"
    assert args[args.index("--rdzv-endpoint") + 1] == "10.0.0.5:29400"
    assert "--standalone" in torchrun_args(TrainConfig(), "homer-abc")
    with pytest.raises(ValueError, match="node_rank 2 must be below nnodes=2"):
        TrainConfig(batch_size=16, nnodes=2, node_rank=2, rdzv_endpoint="10.0.0.5:29400")


def metric_lines(objects: dict[str, bytes], fp: str, manifest: dict) -> list[dict]:
    """The output's metrics.jsonl as the bucket holds it (in its writer's folder, the manifest's `dir`)."""
    key = "/".join(filter(None, ("pretrain", fp, manifest.get("dir"), "metrics.jsonl")))
    return [json.loads(line) for line in objects[key].decode().splitlines() if line.strip()]


@pytest.mark.cluster
@pytest.mark.slow
def test_pretraining_on_two_hosts_matches_one_process(cluster, tmp_path):
    run_data_stages(cluster)  # reused when an earlier test made them
    train1 = cluster.hosts["train-1"]
    if "train-2" not in cluster.hosts:
        cluster.add_host("train-2")
    config = tmp_path / "tiny.yaml"  # the operator's config file, readable on both hosts
    config.write_text(yaml.safe_dump({"pretrain": TINY_PRETRAIN}))
    stage = [f"{VENV_BIN}/homer", "stage", "pretrain", "--profile", "default", "--config", str(config)]

    one = cluster.run("train-1", stage, timeout=300)  # one process (reused when test_hosts made it: same config)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]

    world = ["--set", "pretrain.train.nnodes=2", "--set", f"pretrain.train.rdzv_endpoint={train1.address}:{RDZV_PORT}"]
    procs = {}
    for node, host in enumerate(("train-1", "train-2")):
        env = cluster.host_env(host, GLOO_SOCKET_IFNAME="eth0")  # the host name resolves to no address here
        procs[host] = cluster.spawn(host, [*stage, *world, "--set", f"pretrain.train.node_rank={node}"], env=env,
                                    log=f"pretrain-node{node}")
    deadline = time.monotonic() + 300
    for host, proc in procs.items():
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, f"`homer stage pretrain` on {host} ended with {code}\n" + "\n".join(
            cluster.log_tail(f"{h}-pretrain-node{n}") for n, h in enumerate(procs))

    objects = cluster.bucket_objects()
    found = manifests(objects, "pretrain")  # every test of the session trains into it: pick ours by the fingerprints printed
    fp1, fp2 = printed_output(one.stdout), printed_output((cluster.logs / "train-1-pretrain-node0.log").read_text(errors="replace"))
    single, double = found[fp1], found[fp2]
    assert (single["counts"]["world_size"], double["counts"]["world_size"]) == (1, 2)
    assert double["hosts"] == [train1.hostname, cluster.hosts["train-2"].hostname], double["hosts"]
    # one host; reused from test_hosts when it made it, on whichever training host took that run (the fault tests add train-2)
    assert len(single["hosts"]) == 1 and single["hosts"][0] in {train1.hostname, cluster.hosts["train-2"].hostname}, single
    assert double["counts"]["steps"] == single["counts"]["steps"] > 0
    a, b = metric_lines(objects, fp1, single), metric_lines(objects, fp2, double)
    assert len(a) == len(b) and any("val_loss" in line for line in a)
    for x, y in zip(a, b):
        assert x["step"] == y["step"] and x.keys() == y.keys()
        for key in ("loss", "val_loss", "train_loss"):
            if key in x:
                assert math.isclose(x[key], y[key], rel_tol=1e-5), (key, x, y)
    assert math.isclose(double["metrics"]["best_val_loss"], single["metrics"]["best_val_loss"], rel_tol=1e-5)
    logs = cluster.log_tail("train-2-pretrain-node1", 20000)
    assert "waiting for machine 0" in logs, logs  # train-2 committed nothing: it waited for train-1's commit


def printed_output(text: str) -> str:
    """The fingerprint of the pretrain output `homer stage pretrain` printed in its summary."""
    found = re.findall(r"^pretrain\s+\S+/pretrain/([0-9a-f]{16})\b", text, flags=re.M)
    assert found, text[-3000:]
    return found[-1]
