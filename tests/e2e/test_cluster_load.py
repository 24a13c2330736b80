"""Load on a PostgreSQL-backed server: N stage runs submitted at once to two workers on one pool.

A `Stack` whose server keeps its state in a fresh PostgreSQL database (the `postgres_url`
fixture), with two process workers on homer-pool (`load-1`, `load-2`; the pool runs at most
LOAD_CONCURRENCY flow runs at a time, so two cores are not asked to import torch ten times at
once). N `ingest-simpsons` runs on the bundled sample, each with an artifact root of its own
(the `data_dir` parameter tells them apart), are created through the REST API concurrently.
Every run completes, and each ran exactly once: the server holds exactly the N runs created;
each went through one RUNNING and one COMPLETED state, under a process of its own; exactly one
worker's submission went through (the other's attempt is aborted by the server: both workers
poll the pool and race for each run); its log says it started once; its root holds one output. benchmarks/bench_cluster_load.py runs the same load (50 runs)
against PostgreSQL and SQLite side by side, with the helpers below.

    python -m pytest tests/e2e/test_cluster_load.py -q      # needs PostgreSQL (`make postgres`)
"""

from __future__ import annotations

import contextlib
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest

from tests.e2e.conftest import FINAL, POOL, Stack, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.cluster, pytest.mark.slow]

LOAD_DEPLOYMENT = "ingest-simpsons/ingest-simpsons"  # the cheapest stage: the bundled sample CSV
LOAD_WORKERS = ("load-1", "load-2")
LOAD_CONCURRENCY = 4  # flow runs at a time in homer-pool (each imports torch: ~7 CPU-s)
STARTED = "config: started from"  # the stage flow's first log line (flows/ingest_simpsons.py)


@contextlib.contextmanager
def load_stack(root: Path, database_url: str | None = None) -> Iterator[Stack]:
    """A server (on `database_url`, else SQLite), homer-pool, the one deployment (deploying all of
    prefect.yaml imports every flow: a minute of CPU) and two workers on homer-pool."""
    stack = Stack(root, database_url=database_url)
    try:
        stack.start_server()
        stack.cli("work-pool", "create", POOL, "--type", "process")
        stack.cli("work-pool", "set-concurrency-limit", POOL, str(LOAD_CONCURRENCY))
        stack.cli("--no-prompt", "deploy", "--name", LOAD_DEPLOYMENT.split("/")[1], timeout=240)
        for name in LOAD_WORKERS:
            stack.start_worker(name, POOL)
        yield stack
    finally:
        stack.close()


RETRIED = (429, 502, 503)  # what Prefect's own client retries (prefect.client.base): a busy server, not a refusal


def submit_load(stack: Stack, runs: int, busy: list[int] | None = None) -> dict[str, str]:
    """Create `runs` flow runs of LOAD_DEPLOYMENT at once (one thread each, through the REST API),
    each with an artifact root of its own; returns flow run id -> that root. An answer in RETRIED is
    retried after a back-off, as Prefect's client does, and its status appended to `busy`."""
    import httpx

    deployment = stack.deployment_id(LOAD_DEPLOYMENT)
    roots = [str(stack.root / "load" / f"run-{i:03d}") for i in range(runs)]
    config = {"source": "sample"}

    def create(data_dir: str) -> str:
        body = {"parameters": {"config": config, "data_dir": data_dir}}
        for attempt in range(8):
            try:
                return stack.rest("POST", f"/deployments/{deployment}/create_flow_run", json=body)["id"]
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code not in RETRIED or attempt == 7:
                    raise
                if busy is not None:
                    busy.append(exc.response.status_code)
                time.sleep(min(2 ** attempt * 0.25, 10))

    with ThreadPoolExecutor(max_workers=min(runs, 16)) as pool:
        ids = list(pool.map(create, roots))
    return dict(zip(ids, roots))


def deployment_runs(stack: Stack) -> list[dict]:
    """Every flow run of LOAD_DEPLOYMENT the server holds (one query, paged)."""
    deployment = str(stack.deployment_id(LOAD_DEPLOYMENT))
    found, offset = [], 0
    while True:
        page = stack.rest("POST", "/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment]}},
                                                              "limit": 200, "offset": offset})
        found += page
        if len(page) < 200:
            return found
        offset += len(page)


def wait_all_final(stack: Stack, ids, timeout: float) -> float:
    """Wait until every run in `ids` is in a final state; returns the seconds waited."""
    start, ids = time.monotonic(), {str(i) for i in ids}

    def done():
        final = {r["id"] for r in deployment_runs(stack) if r["state_type"] in FINAL}
        return ids <= final

    wait_until(f"{len(ids)} flow runs of {LOAD_DEPLOYMENT} to finish", done, timeout=timeout, interval=1.0,
               detail=lambda: "\n".join(stack.log_tail(n, 1500) for n in LOAD_WORKERS))
    return time.monotonic() - start


def audit_load(stack: Stack, submitted: dict[str, str]) -> dict:
    """Check every submitted run ran exactly once. Returns counts and, per problem, the runs:
    `lost` (not COMPLETED, or missing on the server), `duplicated` (more runs on the server than
    submitted for one root, or a run that was running or completed, submitted to infrastructure,
    started in its log, or wrote an output more than once; PENDING may be proposed twice, by the
    worker and by the flow-run process) and `per_worker` (runs each worker took)."""
    on_server = deployment_runs(stack)
    by_root: dict[str, list[dict]] = {}
    for run in on_server:
        by_root.setdefault(run["parameters"].get("data_dir"), []).append(run)
    worker_logs = {name: (stack.logs / f"{name}.log").read_text(errors="replace") for name in LOAD_WORKERS}
    lost, duplicated, per_worker, pids = [], [], {name: 0 for name in LOAD_WORKERS}, set()
    for run_id, root in submitted.items():
        runs = by_root.get(root, [])
        if [r["id"] for r in runs] != [run_id]:
            (lost if not runs else duplicated).append((run_id, f"server runs for {root}: {[r['id'] for r in runs]}"))
        run = next((r for r in runs if r["id"] == run_id), None)
        if run is None or run["state_type"] != "COMPLETED":
            lost.append((run_id, run and run["state_type"]))
            continue
        pids.add(run.get("infrastructure_pid"))
        states = [s["type"] for s in stack.rest("GET", "/flow_run_states/", params={"flow_run_id": run_id})]
        for name, text in worker_logs.items():  # who took it (the worker's own log; a lost race is aborted)
            if f"submitting flow run '{run_id}'" in text and f"Aborted submission of flow run '{run_id}'" not in text:
                per_worker[name] += 1
        logs = stack.run_logs(run_id)
        started = sum(line.startswith(STARTED) for line in logs)
        went_through = sum("submitting flow run" in line for line in logs) - sum("Aborted submission" in line for line in logs)
        outputs = list(Path(root).glob("ingest-simpsons/*/manifest.json"))
        checks = {"RUNNING states": states.count("RUNNING"), "COMPLETED states": states.count("COMPLETED"),
                  "submissions in its log": went_through, "starts in its log": started, "outputs": len(outputs)}
        if any(count != 1 for count in checks.values()):
            (duplicated if any(count > 1 for count in checks.values()) else lost).append((run_id, checks))
    return {"submitted": len(submitted), "on_server": len(on_server), "lost": lost, "duplicated": duplicated,
            "per_worker": per_worker, "processes": len(pids - {None})}


def test_n_stage_runs_at_once_on_two_workers_each_run_exactly_once(postgres_url, tmp_path_factory):
    import psycopg2

    runs = 10
    with load_stack(tmp_path_factory.mktemp("cluster-load"), database_url=postgres_url) as stack:
        submitted = submit_load(stack, runs)
        assert len(set(submitted)) == runs
        wait_all_final(stack, submitted, timeout=600)
        report = audit_load(stack, submitted)
        assert report["lost"] == [] and report["duplicated"] == [], report
        assert report["on_server"] == runs, report  # the server's count: nothing created twice, nothing dropped
        assert report["processes"] == runs, report  # a process of its own for each run
        assert sum(report["per_worker"].values()) == runs, report
        assert not list((stack.root / "prefect-home").glob("*.db")), "the server made a SQLite database"
    # the runs are rows of the PostgreSQL database, not of a SQLite file
    with psycopg2.connect(postgres_url.replace("postgresql+asyncpg://", "postgresql://"), connect_timeout=5) as db:
        with db.cursor() as cursor:
            cursor.execute("SELECT state_type, count(*) FROM flow_run GROUP BY state_type")
            assert dict(cursor.fetchall()) == {"COMPLETED": runs}
