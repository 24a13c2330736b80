"""One Optuna study in PostgreSQL, filled by `homer sweep` processes on two hosts of their own.

Two sweep hosts (`sweep-1`, `sweep-2`) each start `homer sweep pretrain --storage postgresql://...`
at once, against the cluster's server and bucket. The study's database is reached through the
relay on the bridge (no host reaches the machine's loopback); each trial trains as a flow run of
the `sweep-trial` deployment on the training pool's workers, which report to the same study. No
trial number is handed out twice, each trial trains once, and both sweeps see all four.

    .venv/bin/python -m pytest tests/cluster/test_shared_sweep.py -q      # as root
"""

from __future__ import annotations

import pytest
import yaml

from tests.cluster.conftest import VENV_BIN, run_data_stages
from tests.flows.test_sweep_flows import LR, TINY, this_run

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# the flow tests' tiny trials, on the CPU; no early stop, so every trial trains its steps
TRIAL = [*TINY, "pretrain.train.early_stopping_patience=null", "pretrain.train.device=cpu"]


def test_two_sweep_hosts_fill_one_study_in_postgresql_and_no_trial_runs_twice(cluster, tmp_path):
    import optuna

    from tests.postgres import fresh_database

    run_data_stages(cluster)  # reused when an earlier test made them
    for name in ("sweep-1", "sweep-2"):
        if name not in cluster.hosts:
            cluster.add_host(name)
    space = tmp_path / "space.yaml"  # the operator's file, readable on both hosts
    space.write_text(yaml.safe_dump({LR: {"low": 1e-4, "high": 3e-2, "log": True}}))
    relay_host, relay_port = cluster.relay.address
    with fresh_database("homer_sweep") as db:
        storage = db.at(relay_host, relay_port).url  # the bridge address: what every host, workers included, reaches
        argv = [f"{VENV_BIN}/homer", "sweep", "pretrain", "--profile", "default", "--trials", "2", "--parallel", "2",
                "--storage", storage, "--study", "shared", "--space", str(space), *[a for s in TRIAL for a in ("--set", s)]]
        procs = {name: cluster.spawn(name, argv, log="sweep") for name in ("sweep-1", "sweep-2")}
        for name, proc in procs.items():
            try:
                proc.wait(timeout=600)
            except Exception:
                proc.kill()
                raise
            assert proc.returncode == 0, f"the sweep in {name} exited {proc.returncode}:\n{cluster.log_tail(f'{name}-sweep')}"
        outputs = {name: (cluster.logs / f"{name}-sweep.log").read_text() for name in procs}
        runs = {name: this_run(text) for name, text in outputs.items()}
        assert runs["sweep-1"].isdisjoint(runs["sweep-2"]) and runs["sweep-1"] | runs["sweep-2"] == {0, 1, 2, 3}, runs

        study = optuna.load_study(study_name="shared", storage=db.url)  # the same database, from this machine
        assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
        outcomes = [t.user_attrs["outcome"] for t in study.trials]
        assert all(o["state"] in ("complete", "pruned") for o in outcomes), outcomes
        trained = [o["fingerprint"] for o in outcomes if not o["reused"]]
        assert len(trained) == len(set(trained)), outcomes

    # each trial was one flow run of the sweep-trial deployment, on a worker of the training pool (not a sweep host)
    deployment = str(cluster.stack.deployment_id("sweep-trial/sweep-trial"))
    trial_runs = cluster.stack.rest("POST", "/flow_runs/filter", json={
        "flow_runs": {"deployment_id": {"any_": [deployment]}}, "limit": 50})
    numbers = sorted(run["parameters"]["trial"]["number"] for run in trial_runs
                     if run["parameters"]["trial"]["study"] == "shared")
    assert numbers == [0, 1, 2, 3], [(r["name"], r["state_type"]) for r in trial_runs]
    sweep_hosts = {cluster.hosts[name].hostname for name in procs}
    places = {str(run.get("infrastructure_pid") or "").split(":", 1)[0] for run in trial_runs}
    assert places and not places & sweep_hosts, places
