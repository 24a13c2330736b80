"""`homer` killed with SIGKILL takes its temporary Prefect server with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _children(pid: int) -> list[int]:
    kids = []
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(status.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_sigkill_of_homer_leaves_no_server_behind(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(HOMER_DATA_DIR=str(tmp_path / "data"), PREFECT_HOME=str(tmp_path / "prefect"))
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--profile", "sample"], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = None
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and server is None and proc.poll() is None:
            server = next((p for p in _children(proc.pid) if "uvicorn" in _cmdline(p)), None)
            time.sleep(0.2)
        assert server is not None, "homer started no temporary server"
        time.sleep(1.0)  # killed while the server starts: the watchdog knows it from the moment it exists
        assert _alive(server) and os.getpgid(server) == server  # in a session of its own: Ctrl-C is for homer
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _alive(server):
            time.sleep(0.2)
        assert not _alive(server), f"server {server} outlived homer: {_cmdline(server)}"
    finally:
        if proc.poll() is None:
            proc.kill()
        if server and _alive(server):
            os.killpg(server, signal.SIGKILL)


def test_a_command_on_the_temporary_server_ends_and_takes_it_along(tmp_path):
    """The normal path: queued logs are flushed while the server is up, then it stops, and `homer` exits."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(HOMER_DATA_DIR=str(tmp_path / "data"), PREFECT_HOME=str(tmp_path / "prefect"))
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "stage", "ingest-simpsons", "--profile", "sample"], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    servers: set[int] = set()
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        servers.update(p for p in _children(proc.pid) if "uvicorn" in _cmdline(p))
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert "Error logging to API" not in out + err and (tmp_path / "data" / "ingest-simpsons" / "latest").exists()
    assert servers and not [p for p in servers if _alive(p)]
