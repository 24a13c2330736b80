"""How many CPU threads a training process uses: its share of the cores it was given.

Torch takes every core by default, so two trainings on one machine (two runs on one
worker, or DDP ranks) oversubscribe it and each crawls. A training process registers in a
per-machine folder (one locked file per process); its share is the cores it may use
(CPU affinity, capped by the cgroup's CPU quota) divided by the live registrations, and it
re-checks every few seconds, so a run that started alone gives cores back when another
starts and takes them again when that one ends. `train.num_threads` fixes the number.

    with CoreShare(fixed=None) as share:      # registers, sets torch's thread count
        for step in ...:
            share.rebalance()                 # cheap; acts at most every `interval_s`
"""

from __future__ import annotations

import fcntl
import math
import os
import tempfile
import time
from pathlib import Path

import torch

REGISTRY = Path(os.environ.get("HOMER_TRAINING_REGISTRY") or Path(tempfile.gettempdir()) / f"homer-training-{os.getuid()}")


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by the cgroup v2 or v1 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, math.floor(quota)) if quota else cores)


def _cgroup_quota() -> float | None:
    try:
        fields = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if fields and fields[0] != "max":
            return int(fields[0]) / int(fields[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 else None
    except (OSError, ValueError):
        return None


def live_trainings(registry: Path = REGISTRY) -> int:
    """Training processes registered on this machine and still alive (their lock is held)."""
    alive = 0
    for path in registry.glob("*.lock"):
        try:
            with open(path, "a") as probe:
                try:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    alive += 1
                    continue
                fcntl.flock(probe, fcntl.LOCK_UN)
            path.unlink(missing_ok=True)  # left by a process that died
        except OSError:
            continue
    return alive


class CoreShare:
    """Register this process as a training and keep torch's thread count at its share of the cores."""

    def __init__(self, fixed: int | None = None, registry: Path = REGISTRY, interval_s: float = 5.0):
        self.fixed, self.registry, self.interval_s = fixed, registry, interval_s
        self.threads = 0
        self.checked_at = 0.0
        self._file = None

    def __enter__(self) -> "CoreShare":
        self.previous = torch.get_num_threads()
        if self.fixed:
            self._set(self.fixed)
            return self
        self.registry.mkdir(parents=True, exist_ok=True)
        self._file = open(self.registry / f"{os.getpid()}-{time.monotonic_ns()}.lock", "w")
        fcntl.flock(self._file, fcntl.LOCK_EX)
        self.rebalance(force=True)
        return self

    def share(self) -> int:
        return max(1, available_cores() // max(1, live_trainings(self.registry)))

    def rebalance(self, force: bool = False) -> None:
        if self.fixed or self._file is None:
            return
        now = time.monotonic()
        if force or now - self.checked_at >= self.interval_s:
            self.checked_at = now
            self._set(self.share())

    def _set(self, threads: int) -> None:
        if threads != self.threads:
            torch.set_num_threads(threads)
            self.threads = threads

    def __exit__(self, *_) -> None:
        torch.set_num_threads(self.previous)
        self.threads = 0
        if self._file is not None:
            path = Path(self._file.name)
            self._file.close()
            path.unlink(missing_ok=True)
            self._file = None
