"""Small helpers shared by test modules (no fixtures, no side effects on import)."""

from __future__ import annotations


def run_twice_at_once(fn) -> list:
    """Call fn() in two threads at the same time; return both results (re-raising any error)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(fn) for _ in range(2)]
        return [f.result() for f in futures]
