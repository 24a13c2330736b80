"""Prefect's temporary server for one `homer` command, gone when the command is, however it ends.

With no PREFECT_API_URL, Prefect starts a temporary server in a subprocess and stops it at
exit; a `homer` killed by a signal (SIGKILL included) would leave it running for good. Here
the server starts in a session of its own (a terminal's Ctrl-C is for `homer`, which then
reports the run Cancelled through it), and a watchdog process holds the read end of a pipe
whose write end only `homer` holds: when `homer` dies, by any signal, the pipe closes and
the watchdog stops the server's whole process group.

    with temporary_server():      # a no-op when PREFECT_API_URL names a server
        homer_pipeline(config)
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Iterator

WATCHDOG = """
import os, signal, sys, time
groups = [int(pid) for pid in sys.stdin.buffer.read().split()]  # at EOF: the homer process is gone (or done)
for group in groups:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
"""


def _in_own_session(popen):
    def start(*args, **kwargs):
        kwargs.setdefault("start_new_session", True)
        return popen(*args, **kwargs)

    return start


def _flush_to(server) -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    if server.server_process is None:
        return
    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=5)
        except Exception:  # noqa: BLE001 - a failed flush must not hide the command's own outcome
            pass


@contextlib.contextmanager
def temporary_server() -> Iterator[str | None]:
    """Run the body against a temporary server that cannot outlive this process; yields its API URL."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield None
        return

    # Started first, so that no moment exists when a server runs without a watchdog.
    watchdog = subprocess.Popen([sys.executable, "-c", WATCHDOG], stdin=subprocess.PIPE, start_new_session=True)

    class OwnSessionServer(SubprocessASGIServer):
        def _run_uvicorn_command(self):
            original = subprocess.Popen
            subprocess.Popen = _in_own_session(original)  # only for this one call, before any flow runs
            try:
                process = super()._run_uvicorn_command()
            finally:
                subprocess.Popen = original
            watchdog.stdin.write(f"{process.pid}\n".encode())
            watchdog.stdin.flush()
            return process

    server = OwnSessionServer()
    try:
        server.start()
        os.environ["HOMER_TEMPORARY_SERVER"] = "1"  # for flow runs in this process: no lease reaper runs here
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        _flush_to(server)  # logs and events still queued go out while the server is up
        server.stop()
        watchdog.stdin.close()  # the watchdog finds the group gone and exits
        try:
            watchdog.wait(timeout=10)
        except subprocess.TimeoutExpired:
            watchdog.kill()
