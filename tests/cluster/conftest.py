"""Hosts of their own: network namespaces on a bridge, for the cluster and fault tests.

`cluster` (session-scoped) builds, on a private /24 picked per run (10.213.X.0/24, X random and
unused on this machine), a Linux bridge in the root namespace (at .1) and one network namespace
per host, each with a veth into the bridge (`eth0` inside, .2, .3, ... in order of creation),
its own loopback, and a host name of its own (every process is started in a UTS namespace named
after the host, so `socket.gethostname()` differs by host):

    server    `prefect server start` on 0.0.0.0:4200, with an auth string, its state in a fresh
              PostgreSQL database (tests/postgres.py). The machine's PostgreSQL listens on the
              root namespace's loopback, which no namespace can reach, so a small TCP relay in
              the test process (`Relay`) listens on the bridge's root address and forwards to
              127.0.0.1:5432. (Chosen over an instance of its own in the namespace: initdb
              refuses root and takes seconds, and the relay reuses fresh_database().)
    storage   moto's S3 server (`python -m moto.server`) on :5000; bucket `homer-cluster`
    cpu       a `prefect worker` on pool homer-pool
    train-1   a `prefect worker` on pool homer-gpu

Both pools, the `gpu` limit and `prefect deploy --all` (prefect.yaml as it is) are made from the
root namespace, through the bridge. Each worker has an empty working directory and HOME (so its
own PREFECT_HOME and cache) and reaches the server and the bucket only by their host addresses:
its environment (`cluster.host_env(name)`) is built from nothing, with no 127.0.0.1 in it, and
HOMER_DATA_DIR=s3://homer-cluster/<random>.

The API, for the tests here and the fault tests:

    cluster.add_host("train-2") -> Host      # a new namespace on the bridge (name, netns, address, hostname, home, workdir)
    cluster.hosts["server"].address          # "10.213.X.2"; cluster.gateway: the root namespace's address on the bridge
    cluster.host_env("train-2", **more)      # a clean environment for that host: PATH, HOME, Prefect, AWS, HOMER_DATA_DIR
    cluster.spawn("train-2", argv, env=None, cwd=None, log="name") -> Popen   # runs in the host; logs/<host>-<log>.log
    cluster.run("cpu", argv, env=None, timeout=120) -> CompletedProcess       # to completion, output captured
    cluster.start_worker("train-2", pool)    # a `prefect worker` in that host (Stack.start_worker, waits until online)
    cluster.pids("train-1") -> set[int]      # every process in the host's namespace (`ip netns pids`)
    cluster.kill_host("train-1")             # SIGKILL every one of them; returns once none is left
    cluster.link("train-1", up=False)        # take the host's link down (its bridge port); up=True brings it back
    cluster.restart_server()                 # kill the server host's processes, start the server again (same database)
    cluster.stack                            # the tests.e2e Stack: .client, .trigger(), .wait_final(), .flow_run(), .cli()
    cluster.bucket_objects() -> {key: bytes} # everything under the data root, read from the root namespace
    cluster.log_tail(name)                   # the end of a process's log, for failure messages

Everything is torn down at session end, also when a test fails: every process in every host, the
namespaces, the veths, the bridge, the relay, the database. Names carry the prefix `hmr` and the
hex PID of the pytest process that made them (`hmr-<pid>-<host>` namespaces, `hmr<pid>b` bridge,
`hmr<pid>v<n>` veths); a run first removes what a crashed run left (those whose PID is gone) and
never touches another live run's. Without root or `ip netns` the tests skip, saying why.

    .venv/bin/python -m pytest tests/cluster -q         # as root; about two minutes
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import GPU_POOL, POOL, PYTHON, REPO, Stack, wait_until

PREFIX = "hmr"
SERVER_PORT = 4200
S3_PORT = 5000
BUCKET = "homer-cluster"
VENV_BIN = str(Path(sys.executable).parent)
SAMPLE_DATA = {"wikipedia": {"source": "sample"}, "simpsons": {"source": "sample"}, "prepare": {"lines_per_doc": 10}}


def _ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def namespace_problem() -> str | None:
    """None when this process can build network namespaces; else why not (for pytest.skip)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (the cluster tests run as root on the project's machines)"
    for tool in ("ip", "unshare", "hostname"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: iproute2, util-linux, hostname)"
    try:
        _ip("netns", "list")
    except (RuntimeError, OSError) as exc:
        return f"`ip netns` does not work here: {exc}"
    return None


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _netns_pids(netns: str) -> set[int]:
    return {int(p) for p in _ip("netns", "pids", netns, check=False).split()} - {os.getpid()}


def remove_leftovers() -> list[str]:
    """Remove the namespaces, veths and bridges of earlier runs whose pytest process is gone; returns their names."""
    removed = []
    for line in _ip("netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        if (m := re.match(rf"{PREFIX}-([0-9a-f]+)-", name)) and not _pid_alive(int(m[1], 16)):
            for pid in _netns_pids(name):
                os.kill(pid, signal.SIGKILL)
            _ip("netns", "del", name, check=False)
            removed.append(name)
    for line in _ip("-o", "link", "show").splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if (m := re.fullmatch(rf"{PREFIX}([0-9a-f]+)[bv]\d*", name)) and not _pid_alive(int(m[1], 16)):
            _ip("link", "del", name, check=False)
            removed.append(name)
    return removed


def pick_subnet() -> str:
    """'10.213.X' for a /24 that no address or route on this machine uses."""
    used = _ip("-o", "addr") + _ip("route") + _ip("-o", "link")
    for x in random.sample(range(1, 255), 254):
        if f"10.213.{x}." not in used:
            return f"10.213.{x}"
    raise RuntimeError("no free 10.213.X.0/24 on this machine")


def _mac(link: str) -> str:
    return Path(f"/sys/class/net/{link}/address").read_text().strip()


class Relay:
    """A TCP relay in this (the root) namespace: listens on (host, port), forwards each connection to `target`."""

    def __init__(self, host: str, target: tuple[str, int]):
        self.target = target
        self.listener = socket.create_server((host, 0))
        self.address = self.listener.getsockname()
        self.closed = False
        threading.Thread(target=self._accept, name="hmr-relay", daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.closed = True
        self.listener.close()


@dataclass
class Host:
    name: str
    netns: str
    address: str
    veth: str  # its end in the root namespace, a port of the bridge
    hostname: str
    home: Path
    workdir: Path


class ClusterStack(Stack):
    """The e2e Stack with its server in the `server` host, reached at that host's address; workers in hosts too."""

    def __init__(self, root: Path, cluster: "Cluster", database_url: str):
        super().__init__(root, database_url=database_url)
        self.cluster = cluster
        self.placement: dict[str, str] = {"server": "server"}  # process name -> the host it runs in
        self.port = SERVER_PORT
        address = cluster.hosts["server"].address
        self.api_url, self.ui_url = f"http://{address}:{SERVER_PORT}/api", f"http://{address}:{SERVER_PORT}"
        for env in (self.env, self.server_env):
            env.update(PREFECT_API_URL=self.api_url, PREFECT_UI_API_URL=self.api_url, PREFECT_SERVER_API_PORT=str(SERVER_PORT),
                       PREFECT_SERVER_API_HOST="0.0.0.0")

    def spawn(self, name, *args, argv=None, env=None, cwd=None):
        argv = argv or [PYTHON, "-m", "prefect", *args]
        if name in self.placement:
            argv = self.cluster.wrap(self.placement[name], argv)
        return super().spawn(name, argv=argv, env=env, cwd=cwd)


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.tag = f"{os.getpid():x}"
        self.subnet = pick_subnet()
        self.gateway = f"{self.subnet}.1"
        self.bridge = f"{PREFIX}{self.tag}b"
        self.hosts: dict[str, Host] = {}
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.data_root = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
        self.aws_secret = f"homer-cluster-secret-{secrets.token_hex(8)}"
        self.stack: ClusterStack | None = None
        self.relay: Relay | None = None
        _ip("link", "add", self.bridge, "type", "bridge")
        # A bridge whose address was never set takes the lowest of its ports' and changes it when a
        # host with a lower one is added: every host's ARP entry for the gateway then points nowhere
        # until it expires, and the server lost PostgreSQL (through the relay) for 20-30 s in CI.
        self.bridge_mac = _mac(self.bridge)
        _ip("link", "set", self.bridge, "address", self.bridge_mac)
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    # -- hosts
    def add_host(self, name: str) -> Host:
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists already")
        n = len(self.hosts) + 2
        netns, veth, peer = f"{PREFIX}-{self.tag}-{name}", f"{PREFIX}{self.tag}v{n}", f"{PREFIX}{self.tag}p{n}"
        host = Host(name, netns, f"{self.subnet}.{n}", veth, f"{PREFIX}-{name}", self.root / name / "home", self.root / name / "work")
        host.home.mkdir(parents=True)
        host.workdir.mkdir(parents=True)
        self.hosts[name] = host  # before the first `ip`: close() removes what was made
        _ip("netns", "add", netns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", netns)
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        if _mac(self.bridge) != self.bridge_mac:
            raise RuntimeError(f"the bridge {self.bridge} changed its address to {_mac(self.bridge)} when {name} joined")
        _ip("-n", netns, "link", "set", peer, "name", "eth0")
        _ip("-n", netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        return host

    def wrap(self, name: str, argv: list[str]) -> list[str]:
        """argv run in host `name`: its network namespace, and a UTS namespace with its host name."""
        host = self.hosts[name]
        return ["ip", "netns", "exec", host.netns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                host.hostname, *argv]

    def host_env(self, name: str, **more: str) -> dict[str, str]:
        """A host's environment, from nothing: the venv on PATH, its own HOME, the server and bucket by address."""
        host, storage = self.hosts[name], self.hosts["storage"]
        env = {"PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(host.home),
               "PREFECT_HOME": str(host.home / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "2",
               "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
               "HOMER_DATA_DIR": self.data_root,
               "AWS_ENDPOINT_URL": f"http://{storage.address}:{S3_PORT}", "AWS_ACCESS_KEY_ID": "homer-cluster-key",
               "AWS_SECRET_ACCESS_KEY": self.aws_secret, "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_CONFIG_FILE": str(host.home / "no-aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(host.home / "no-aws-credentials"),
               "AWS_EC2_METADATA_DISABLED": "true", "HOMER_CLUSTER_HOST": name,
               # a cut link fails a store call within this (the tests' files take seconds even on a throttled link)
               "HOMER_STORE_TIMEOUT_S": "30"}
        if self.stack is not None:
            env.update(PREFECT_API_URL=self.stack.api_url, PREFECT_API_AUTH_STRING=self.stack.auth_string)
        return {**env, **more}

    def spawn(self, name: str, argv: list[str], env: dict | None = None, cwd: Path | None = None, log: str = "proc") -> subprocess.Popen:
        host = self.hosts[name]
        with open(self.logs / f"{name}-{log}.log", "ab") as out:
            proc = subprocess.Popen(self.wrap(name, argv), env=env or self.host_env(name), cwd=cwd or host.workdir, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, name: str, argv: list[str], env: dict | None = None, cwd: Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.Popen(self.wrap(name, argv), env=env or self.host_env(name), cwd=cwd or self.hosts[name].workdir,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                start_new_session=True)
        self.procs.append(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"{argv} in host {name} did not finish in {timeout:.0f}s:\n{out[-3000:]}\n{err[-3000:]}", pytrace=False)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def start_worker(self, name: str, pool: str, worker: str | None = None) -> subprocess.Popen:
        worker = worker or f"{name}-worker"
        self.stack.placement[worker] = name
        return self.stack.start_worker(worker, pool, env=self.host_env(name), cwd=self.hosts[name].workdir)

    def pids(self, name: str) -> set[int]:
        return _netns_pids(self.hosts[name].netns)

    def kill_host(self, name: str, timeout: float = 10) -> None:
        """SIGKILL every process in the host; return once none is left."""
        deadline = time.monotonic() + timeout
        while pids := self.pids(name):
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {sorted(pids)} in host {name} survive SIGKILL")
            time.sleep(0.1)
        for proc in self.procs:
            proc.poll()  # collect those we started

    def link(self, name: str, up: bool) -> None:
        _ip("link", "set", self.hosts[name].veth, "up" if up else "down")

    def restart_server(self) -> None:
        self.kill_host("server")
        self.stack.procs.pop("server", None)
        self.stack.start_server(host="0.0.0.0")

    def mark(self, what: str, since: float) -> None:
        """Note in logs/timings.log how long the set-up took to reach `what` (this machine's load varies)."""
        with open(self.logs / "timings.log", "a") as f:
            f.write(f"{time.monotonic() - since:7.1f}s {what}\n")

    def log_tail(self, name: str, chars: int = 3000) -> str:
        return self.stack.log_tail(name, chars) if self.stack and name in self.stack.procs else _tail(self.logs / f"{name}.log", chars)

    def s3(self):
        import boto3

        return boto3.client("s3", endpoint_url=f"http://{self.hosts['storage'].address}:{S3_PORT}", region_name="us-east-1",
                            aws_access_key_id="homer-cluster-key", aws_secret_access_key=self.aws_secret)

    def bucket_objects(self) -> dict[str, bytes]:
        """Every object under the data root, by its key below the root."""
        client, prefix = self.s3(), self.data_root.split("/", 3)[3] + "/"
        keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
                for o in page.get("Contents", [])]
        return {k[len(prefix):]: client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}

    def close(self) -> None:
        errors: list[Exception] = []
        if self.stack is not None:
            try:
                self.stack.close()
            except Exception as exc:  # keep tearing down
                errors.append(exc)
        for name in list(self.hosts):
            try:
                self.kill_host(name)
            except Exception as exc:
                errors.append(exc)
            _ip("netns", "del", self.hosts[name].netns, check=False)
            _ip("link", "del", self.hosts[name].veth, check=False)  # gone with its peer already, normally
        _ip("link", "del", self.bridge, check=False)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if self.relay is not None:
            self.relay.close()
        if errors:
            raise errors[0]


def _tail(path: Path, chars: int) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return f"--- {path} (last {chars} chars)\n{text[-chars:]}"


def _wait_http(what: str, url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    import httpx

    def up():
        if proc.poll() is not None:
            pytest.fail(f"{what} exited {proc.returncode}\n{_tail(log, 3000)}", pytrace=False)
        return httpx.get(url, timeout=2).status_code < 500

    wait_until(what, up, timeout=timeout, detail=lambda: _tail(log, 3000))


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """Server (PostgreSQL), storage (moto S3), cpu (homer-pool) and train-1 (homer-gpu) hosts; see the module docstring."""
    if (why := namespace_problem()) is not None:
        pytest.skip(why)
    from tests.postgres import fresh_database, postgres_problem

    if (why := postgres_problem()) is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    remove_leftovers()
    with contextlib.ExitStack() as cleanup:  # unwound in reverse: the hosts (and the server) go before the database
        db = cleanup.enter_context(fresh_database("homer_cluster"))
        cluster = Cluster(tmp_path_factory.mktemp("cluster"))
        cleanup.callback(cluster.close)
        started = time.monotonic()
        for name in ("server", "storage", "cpu", "train-1"):
            cluster.add_host(name)
        storage = cluster.hosts["storage"]
        moto = cluster.spawn("storage", [PYTHON, "-m", "moto.server", "-H", storage.address, "-p", str(S3_PORT)],
                             env={"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": str(storage.home), "LANG": "C.UTF-8"}, log="moto")
        cluster.relay = Relay(cluster.gateway, (db.host, db.port))
        relay_host, relay_port = cluster.relay.address
        cluster.stack = ClusterStack(cluster.root / "stack", cluster, db.at(relay_host, relay_port).asyncpg_url)
        _wait_http("moto's S3 server in the storage host", f"http://{storage.address}:{S3_PORT}/", moto,
                   cluster.logs / "storage-moto.log")
        cluster.s3().create_bucket(Bucket=BUCKET)
        cluster.mark("hosts and bucket", started)
        cluster.stack.start_server(host="0.0.0.0")
        cluster.mark("server on PostgreSQL", started)
        cluster.stack.provision()
        cluster.mark("pools and deployments", started)
        cluster.start_worker("cpu", POOL)
        cluster.start_worker("train-1", GPU_POOL)
        cluster.mark("workers online", started)
        yield cluster


def run_data_stages(cluster: Cluster, timeout: float = 240) -> dict[str, str]:
    """Ingest both samples and prepare them through the API (their deployments, on homer-pool); stage -> flow run id."""
    stack = cluster.stack
    runs = {stage: stack.trigger(f"{stage}/{stage}", {"config": SAMPLE_DATA[section]})
            for stage, section in (("ingest-wikipedia", "wikipedia"), ("ingest-simpsons", "simpsons"))}
    for run_id in runs.values():
        stack.wait_final(run_id, timeout=timeout)
    runs["prepare"] = stack.trigger("prepare/prepare", {"config": SAMPLE_DATA["prepare"]})
    stack.wait_final(runs["prepare"], timeout=timeout)
    return runs


# The one-process pretraining both tests run (the same fingerprint: the second reuses it); dropout 0, so that
# two processes give the losses of one (each rank's dropout masks differ).
TINY_PRETRAIN = {"model": {"embedding_dim": 16, "hidden_sizes": [32], "dropout": 0.0},
                 "train": {"epochs": 1, "max_steps": 24, "batch_size": 16, "checkpoint_every_steps": 8, "log_every_steps": 4,
                           "early_stopping_patience": None, "max_val_windows": 32, "eval_every_steps": 12, "device": "cpu"}}


def manifests(objects: dict[str, bytes], stage: str) -> dict[str, dict]:
    """fingerprint -> manifest of every complete output of `stage` in the bucket."""
    return {key.split("/")[1]: json.loads(body) for key, body in objects.items()
            if key.startswith(f"{stage}/") and key.count("/") == 2 and key.endswith("/manifest.json")}
