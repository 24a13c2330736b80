"""Many stage runs at once against a Prefect server on PostgreSQL and one on SQLite, side by side.

For each backend, starts a server (PostgreSQL: a fresh database on HOMER_TEST_POSTGRES,
dropped afterwards; SQLite: the file under the server's PREFECT_HOME), homer-pool with at most
LOAD_CONCURRENCY runs at a time, the `ingest-simpsons` deployment and two process workers; then
creates `--runs` flow runs of it at once through the REST API (each with an artifact root of its
own) and waits until all are final. The load and its audit (lost: not completed; duplicated: a
run created, run or submitted twice) are tests/e2e/test_cluster_load.py's, which runs the same
at 10 runs. Prints a markdown table. Needs the test extra and PostgreSQL (`make postgres`).

    PYTHONPATH=. python benchmarks/bench_cluster_load.py                 # 50 runs per backend
    PYTHONPATH=. python benchmarks/bench_cluster_load.py --runs 10       # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


class PhaseFailed(Exception):
    """A phase of one backend's measurement failed: its name and the first line of why."""


def measure(backend: str, runs: int, work: Path) -> dict:
    import pytest
    from tests.e2e.test_cluster_load import audit_load, load_stack, submit_load, wait_all_final
    from tests.postgres import fresh_database

    database = fresh_database("homer_bench") if backend == "postgresql" else contextlib.nullcontext()
    phase, busy = "starting the server, pool, deployment and workers", []
    try:
        with database as db:
            start = time.monotonic()
            with load_stack(work / backend, database_url=db.asyncpg_url if db else None) as stack:
                ready = time.monotonic() - start
                phase, start = "creating the runs", time.monotonic()
                submitted = submit_load(stack, runs, busy=busy)
                created = time.monotonic() - start
                phase = "waiting for the runs"
                try:
                    wait_all_final(stack, submitted, timeout=max(600, 30 * runs))
                except pytest.fail.Exception as exc:  # not all final in time: the audit counts them as lost
                    print(f"{backend}: {str(exc)[:300]}", file=sys.stderr)
                elapsed = time.monotonic() - start
                phase = "auditing the runs"
                report = audit_load(stack, submitted)
    except (Exception, pytest.fail.Exception) as exc:  # pytest.fail (a bounded wait) is no Exception
        raise PhaseFailed(f"{phase} ({len(busy)} busy answers retried): {str(exc).splitlines()[0][:120]}") from exc
    return {"backend": backend, "ready": ready, "created": created, "busy": len(busy), "elapsed": elapsed, **report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="flow runs submitted at once per backend")
    parser.add_argument("--backends", nargs="+", default=["postgresql", "sqlite"], choices=["postgresql", "sqlite"])
    args = parser.parse_args()
    from tests.e2e.test_cluster_load import LOAD_CONCURRENCY
    from tests.postgres import postgres_problem

    if "postgresql" in args.backends and (why := postgres_problem()):
        sys.exit(why)
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-load-"))
    print(f"\n## {args.runs} ingest-simpsons runs at once, two process workers, pool limit {LOAD_CONCURRENCY}, "
          f"{os.cpu_count()} cores\n")
    print("| server database | server + pool + deployment + workers, s | create all runs, s | busy answers (503, retried) "
          "| submit -> all complete, s | runs/s | lost | duplicated | runs per worker |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |", flush=True)
    problems = []
    for backend in args.backends:  # each row as soon as it is measured
        try:
            row = measure(backend, args.runs, work)
        except PhaseFailed as exc:
            print(f"| {backend} | failed in {exc} | | | | | | | |", flush=True)
            continue
        workers = ", ".join(f"{name} {count}" for name, count in row["per_worker"].items())
        print(f"| {backend} | {row['ready']:.1f} | {row['created']:.2f} | {row['busy']} | {row['elapsed']:.1f} "
              f"| {row['submitted'] / row['elapsed']:.2f} | {len(row['lost'])} | {len(row['duplicated'])} | {workers} |",
              flush=True)
        problems += [(backend, kind, run_id, why) for kind in ("lost", "duplicated") for run_id, why in row[kind]]
    for backend, kind, run_id, why in problems:
        print(f"{backend}: {kind} {run_id}: {why}")

if __name__ == "__main__":
    main()
