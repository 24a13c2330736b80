"""End-to-end fixtures: the real thing, on 127.0.0.1 only, in temporary directories.

One `Stack` per module: `prefect server start` on a free loopback port with an auth string
(PREFECT_SERVER_API_AUTH_STRING, random per stack), the two process work pools of
prefect.yaml (`homer-pool` for the data stages and the pipeline, `homer-gpu` for training),
the `gpu` global concurrency limit, `prefect deploy --all` from the repository root (the
prefect.yaml as it is), and one `prefect worker` per pool whose flow runs write into a
temporary HOMER_DATA_DIR. Every client, worker and CLI call started here has the string as
PREFECT_API_AUTH_STRING (`Stack.rest` and `Stack.client` send it too), and the `browser`
fixture logs in to the UI with it when a test also uses `stack`. Every process started here is
recorded and stopped by its own PID (and its process group, and the flow-run processes it
started) at teardown, also when a test fails. Every wait is bounded and says what it waited for.

The server keeps its state in SQLite under the stack's PREFECT_HOME, or, given
`Stack(root, database_url=...)` (the `postgres_url` fixture: a fresh database on the machine's
PostgreSQL, dropped afterwards), in PostgreSQL through PREFECT_SERVER_DATABASE_CONNECTION_URL,
as the cluster tests run it.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import httpx
import pytest

from tasks.stages import DATA_POOL, GPU_POOL

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable  # the project's venv: its `prefect` is the one the flows use
POOL = DATA_POOL  # the data stages, the report, generate and the whole pipeline
POOLS = (DATA_POOL, GPU_POOL)  # prefect.yaml's pools, as tasks/stages.py names them
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5, detail: Callable[[], str] | None = None):
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception as exc:  # not ready yet (connection refused, 404, ...)
            value, last_error = None, exc
        if value:
            return value
        time.sleep(interval)
    extra = f"; last error: {last_error!r}" if last_error else ""
    more = f"\n{detail()}" if detail else ""
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}{extra}{more}", pytrace=False)


# ---- processes -------------------------------------------------------------------------

def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2:].split()[1])


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of `pid` (children first found first)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (parent := _ppid(int(entry.name))) is not None:
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rfind(")") + 2] != "Z"  # a zombie has exited


def send(pid: int, sig: int) -> None:
    """Signal one PID, and its process group when it leads one (as everything we start does)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_pids(pids: Iterable[int], grace: float = 10.0) -> None:
    """SIGTERM each PID (and its group), wait up to `grace` s, then SIGKILL what is left."""
    pids = [p for p in dict.fromkeys(pids) if p and p != os.getpid() and p != os.getpgrp()]
    for pid in pids:
        send(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if alive(pid):
            send(pid, signal.SIGKILL)


class Stack:
    """A Prefect server, work pool, deployments and workers for one test module."""

    def __init__(self, root: Path, database_url: str | None = None):
        self.root = root
        self.database_url = database_url  # None: SQLite in PREFECT_HOME; else postgresql+asyncpg://... (server only)
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.ui_url = f"http://127.0.0.1:{self.port}"
        self.data_dir = root / "data"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        self.auth_string = secrets.token_urlsafe(24)  # the server's; every client here sends it
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "HOMER_DATA_DIR"}
        env.update({
            "PREFECT_HOME": str(root / "prefect-home"),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_API_AUTH_STRING": self.auth_string,  # workers, flow runs, `homer serve`, the CLI
            "PREFECT_UI_API_URL": self.api_url,  # else the UI's browser code calls the default port
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(self.port),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "2",
            "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
            "PREFECT_CLI_PROMPT": "false",
            "HOMER_DATA_DIR": str(self.data_dir),
            "HOMER_GPU_LIMIT": "always",  # exercise the gpu slot on this CPU machine too
            "HF_HUB_OFFLINE": "1",  # the sample sources never need the network
            "PYTHONUNBUFFERED": "1",
        })
        self.env = env
        self.server_env = {**env, "PREFECT_SERVER_API_AUTH_STRING": self.auth_string}  # the server alone
        if database_url:
            self.server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
            # Prefect's limit is 5 s: room for a busy 2-core machine (the cluster's server reaches the
            # database through a relay, and opens connections lazily)
            self.server_env["PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT"] = "30"
        self.procs: dict[str, subprocess.Popen] = {}
        self.workers: dict[str, str] = {}  # worker name -> its pool
        self.started: list[int] = []  # every PID we started, and flow-run PIDs seen, for teardown
        self._client = None

    # -- processes
    def spawn(self, name: str, *args: str, argv: list[str] | None = None, env: dict | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        """Start `prefect ARGS` (or `argv`) in a session of its own, logging to logs/NAME.log."""
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(argv or [PYTHON, "-m", "prefect", *args], cwd=cwd or REPO, env=env or self.env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs[name] = proc
        self.started.append(proc.pid)
        return proc

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else "(no log)"
        return f"--- {path} (last {chars} chars)\n{text[-chars:]}"

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        self.workers.pop(name, None)
        if proc is not None:
            stop_pids([proc.pid, *descendants(proc.pid)])
            proc.wait(timeout=10)

    def stop_workers(self) -> None:
        """Stop every worker this stack started (whatever its pool)."""
        for name in list(self.workers):
            self.stop(name)

    def close(self) -> None:
        if self._client is not None:
            self._client.__exit__(None, None, None)
            self._client = None
        for name in [n for n in self.procs if n != "server"] + (["server"] if "server" in self.procs else []):
            self.stop(name)
        stop_pids([pid for pid in self.started if self.ours(pid)], grace=5)  # flow-run processes left behind

    def ours(self, pid: int) -> bool:
        """A live process started with this stack's environment (guards against PID reuse)."""
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return False
        return alive(pid) and f"PREFECT_HOME={self.env['PREFECT_HOME']}".encode() in environ.split(b"\0")

    def cli(self, *args: str, timeout: float = 120, env: dict | None = None) -> str:
        """Run `prefect ARGS` to completion; fail with its output if it fails or hangs."""
        try:
            done = subprocess.run([PYTHON, "-m", "prefect", *args], cwd=REPO, env=env or self.env, capture_output=True,
                                  text=True, timeout=timeout, stdin=subprocess.DEVNULL, start_new_session=True)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"`prefect {' '.join(args)}` did not finish in {timeout}s:\n{exc.stdout}\n{exc.stderr}", pytrace=False)
        if done.returncode != 0:
            pytest.fail(f"`prefect {' '.join(args)}` exited {done.returncode}:\n{done.stdout}\n{done.stderr}", pytrace=False)
        return done.stdout + done.stderr

    def start_server(self, host: str = "127.0.0.1") -> None:
        """`prefect server start` on `host` (the cluster tests bind 0.0.0.0 in a host of its own) and self.port."""
        proc = self.spawn("server", "server", "start", "--host", host, "--port", str(self.port), env=self.server_env)

        def healthy():
            if proc.poll() is not None:
                pytest.fail(f"`prefect server start` exited {proc.returncode}\n{self.log_tail('server')}", pytrace=False)
            return httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200  # open: probes need no string

        wait_until(f"the Prefect server on {self.api_url}", healthy, timeout=120, detail=lambda: self.log_tail("server"))

    def provision(self) -> str:
        """prefect.yaml's pools, the `gpu` limit and `prefect deploy --all`; returns deploy's output."""
        for pool in POOLS:
            self.cli("work-pool", "create", pool, "--type", "process")
        self.cli("gcl", "create", "gpu", "--limit", "1")
        return self.cli("--no-prompt", "deploy", "--all", timeout=240)

    def start_worker(self, name: str, pool: str = POOL, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
        proc = self.spawn(name, "worker", "start", "--pool", pool, "--name", name, "--type", "process", env=env, cwd=cwd)
        self.workers[name] = pool

        def online():
            if proc.poll() is not None:
                pytest.fail(f"worker {name} exited {proc.returncode}\n{self.log_tail(name)}", pytrace=False)
            workers = self.client.read_workers_for_work_pool(pool)
            return any(w.name == name and str(w.status).upper().endswith("ONLINE") for w in workers)

        wait_until(f"worker {name} to come online in {pool}", online, timeout=90, detail=lambda: self.log_tail(name))
        return proc

    # -- API
    @property
    def client(self):
        if self._client is None:
            from prefect.client.orchestration import SyncPrefectClient

            self._client = SyncPrefectClient(self.api_url, auth_string=self.auth_string)
            self._client.__enter__()
        return self._client

    @property
    def auth_headers(self) -> dict[str, str]:
        """What Prefect's clients send: HTTP Basic with the auth string as the credentials."""
        return {"Authorization": "Basic " + base64.b64encode(self.auth_string.encode()).decode()}

    def rest(self, method: str, path: str, **kwargs) -> Any:
        response = httpx.request(method, f"{self.api_url}{path}", timeout=30, headers=self.auth_headers, **kwargs)
        response.raise_for_status()
        return response.json() if response.content else None

    def deployment_id(self, name: str):
        return self.client.read_deployment_by_name(name).id

    def trigger(self, deployment: str, parameters: dict | None = None):
        """Create a flow run of `deployment` (flow/name) through the API; returns its id."""
        run = self.client.create_flow_run_from_deployment(self.deployment_id(deployment), parameters=parameters or {})
        return run.id

    def flow_run(self, run_id) -> dict:
        run = self.rest("GET", f"/flow_runs/{run_id}")
        if run.get("infrastructure_pid"):
            pid = int(str(run["infrastructure_pid"]).rsplit(":", 1)[-1])
            if pid not in self.started:
                self.started.append(pid)
        return run

    def run_logs(self, run_id, limit: int = 200) -> list[str]:
        logs = self.rest("POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [str(run_id)]}},
                                                         "sort": "TIMESTAMP_ASC", "limit": limit})
        return [entry["message"] for entry in logs]

    def describe(self, run_id) -> str:
        try:
            run = self.flow_run(run_id)
            head = f"flow run {run_id} '{run['name']}': {run['state_type']} {run['state_name']}: {(run.get('state') or {}).get('message')}"
            return "\n".join([head, "--- its logs:", *self.run_logs(run_id)[-60:], *(self.log_tail(n, 2000) for n in self.procs if n != "server")])
        except Exception as exc:  # the server itself is gone
            return f"flow run {run_id}: cannot read ({exc!r})\n{self.log_tail('server')}"

    def wait_final(self, run_id, expect: str = "COMPLETED", timeout: float = 120) -> dict:
        """Wait until the run is in a final state; fail (with its logs) unless it is `expect`."""
        run = wait_until(f"flow run {run_id} to finish", lambda: (r := self.flow_run(run_id))["state_type"] in FINAL and r,
                         timeout=timeout, detail=lambda: self.describe(run_id))
        if run["state_type"] != expect:
            pytest.fail(f"expected {expect}, got {run['state_type']}\n{self.describe(run_id)}", pytrace=False)
        return run

    def artifacts(self, run_id) -> list[dict]:
        """The flow run's artifacts, read through the REST API."""
        return self.rest("POST", "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [str(run_id)]}}})


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


@pytest.fixture(scope="module")
def postgres_url():
    """A fresh PostgreSQL database for one module's server (`Stack(root, database_url=...)`), as
    postgresql+asyncpg://..., dropped at module end. Skips, saying why, when no PostgreSQL answers
    at HOMER_TEST_POSTGRES (fails when CI=true: `make test` starts one)."""
    from tests.postgres import fresh_database, postgres_problem

    if (why := postgres_problem()) is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    with fresh_database("homer_e2e") as db:
        yield db.asyncpg_url


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Server (with an auth string) + both pools + `prefect deploy --all` + a worker per pool
    (`worker-1` on homer-pool, `gpu-worker-1` on homer-gpu), torn down by PID at module end."""
    stack = Stack(tmp_path_factory.mktemp("e2e"))
    try:
        stack.start_server()
        stack.deploy_output = stack.provision()
        stack.start_worker("worker-1", POOL)
        stack.start_worker("gpu-worker-1", GPU_POOL)
        yield stack
    finally:
        stack.close()


# ---- the browser ---------------------------------------------------------------------

def chromium_binary() -> str | None:
    for candidate in CHROMIUM_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return shutil.which("chromium")


def log_in(driver, stack: Stack, auth_string: str | None = None, timeout: float = 60) -> None:
    """Log in to the UI the way a person does: its login page asks for the server's auth string
    (a password field), keeps it in the browser's localStorage (`prefect-password`) and sends it
    with every API call. Fails (with the page's text) unless the UI lets us in."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{stack.ui_url}/login?redirect=/dashboard")
    wait = WebDriverWait(driver, timeout)
    try:
        field = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "input[type=password]")))
        field.send_keys(auth_string if auth_string is not None else stack.auth_string, Keys.ENTER)
        wait.until(lambda d: "/login" not in d.current_url and d.execute_script("return localStorage.getItem('prefect-password')"))
    except Exception:
        pytest.fail(f"could not log in to the UI at {stack.ui_url} (now at {driver.current_url}); page text:\n"
                    f"{driver.find_element(By.TAG_NAME, 'body').text[:2000]}", pytrace=False)


@pytest.fixture
def browser(tmp_path, request):
    """Headless Debian Chromium through Selenium; fails in CI (CI=true) when it is missing.
    In a test that uses `stack`, it is logged in to that stack's UI (the server has an auth string)."""
    binary = chromium_binary()
    if binary is None or not Path(CHROMEDRIVER).exists():
        reason = f"Chromium or ChromeDriver missing ({'/usr/bin/chromium' if binary is None else CHROMEDRIVER}); `make browser` installs them"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,1350"):
        options.add_argument(arg)
    service = Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver_pid = service.process.pid
    tree = [driver_pid]
    try:
        if "stack" in request.fixturenames:
            log_in(driver, request.getfixturevalue("stack"))
        yield driver
    finally:
        tree += descendants(driver_pid)  # Chromium's own processes, before quit() reparents them
        try:
            driver.quit()
        finally:
            stop_pids([pid for pid in tree if alive(pid)], grace=5)
