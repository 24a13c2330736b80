"""Processes named by PID and start time, so a reused PID is never taken for the process that ended.

`launch()` (distributed.py) records its ranks this way, and a sweep records the process that
asked each trial, so a later sweep can tell a trial whose asker is gone from one still training.

    record = process_record()          # "4711:123456" for this process
    same_process(record)               # True while that very process runs
"""

from __future__ import annotations

import os
from pathlib import Path


def start_time(pid: int) -> str | None:
    """The process's start time (in clock ticks since boot): with the PID, names one process even if PIDs are reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def running(pid: int) -> bool:
    """Alive and not a zombie (an ended process whose parent has not collected it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def process_record(pid: int | None = None) -> str:
    """"<pid>:<start time>" of a process (this one by default)."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{start_time(pid)}"


def same_process(record: str) -> bool:
    """Whether the process a record names still runs (a record without a start time: any process with that PID)."""
    pid, _, start = record.partition(":")
    return running(int(pid)) and (start_time(int(pid)) == start or start in ("", "None"))
