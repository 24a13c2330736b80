"""Training on several processes: DDP under torchrun, each rank running the one training loop.

`launch()` is what a training stage calls when `train.nproc_per_node × train.nnodes` (the world
size W) is above 1. It starts `python -m torch.distributed.run` (torchrun) in a session of its
own, with this module as the per-rank entry point, and watches it until it ends:

- Each rank runs `loop.train()` with `DDPRanks`: gloo on CPU, NCCL on CUDA (`cuda:LOCAL_RANK`).
  `train.batch_size` is the GLOBAL batch; the global batches are the one-process ones
  (`epoch_order(seed, epoch, n)`), and each rank trains on its contiguous B/W slice, so a
  batch is a function of (seed, epoch, step, rank) and W changes neither the global batch nor
  the learning rate (DDP averages the gradients). Before each step every rank reseeds its RNGs
  from (seed, epoch, step, rank): dropout masks differ by rank, and a resume is exact without
  carrying every rank's RNG state in state.json.
- Rank 0 writes last/, best/ and metrics.jsonl; the others wait at a barrier after each save,
  and every rank resumes from the same committed last/. Logged losses are the mean over the
  ranks; each rank validates its part of the validation windows and (nll, chars) are summed,
  so every rank takes the same early-stopping decision.
- A stop (SIGTERM or SIGINT to any rank, or to the task, which passes SIGTERM on to every rank)
  is agreed at each step boundary by an all_reduce of a stop flag; rank 0 saves last/ and all
  ranks exit with the stop's exit code (128 + the signal). A stop waits for the step, or the
  validation, in progress: the one-process watching thread (`loop.run_stoppable`) is not used.
- Restarts are Prefect task retries that resume from last/, never torchrun's own
  (`--max-restarts 0`): a rank that dies makes torchrun fail, and `launch()` raises
  `DistributedTrainingError` naming the rank and how it ended.
- No process is left behind: each rank records its PID (and start time) in the run
  directory, and inherits a marker in its environment; when `launch()` ends for any reason
  (torchrun's end, a stop, an error in a callback) it sends SIGTERM to every rank still alive,
  then SIGKILL after a grace, and kills torchrun's process group. A rank whose launcher or
  torchrun dies (SIGKILL) stops by itself, saving last/ if its peers are alive.
- The task's callbacks (log lines, the progress artifact, the epoch table) still work: rank 0
  writes the loop's events to events.jsonl in the run directory and `launch()` replays them.
  Rank 0 writes the TrainResult (result.json), a stop (stopped.json) or an error (error-N.json).

Run it by hand, on one machine (W = 2 processes; CPU or one GPU each):

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m model.training.distributed \\
        --shards data/prepare/<fp>/shards/wikipedia --vocab data/prepare/<fp>/vocab.json --out /tmp/run \\
        --set batch_size=64 --set model.hidden_sizes=[64,64]

(`nproc_per_node` and `nnodes` come from torchrun). Or let this module start torchrun and watch
it (PIDs, cleanup, Ctrl-C saves last/): the same options without torchrun, and `--set nproc_per_node=2`.

Several machines (`train.nnodes` > 1): each machine runs the same stage with its own
`train.node_rank` (0 on the first), and torchrun meets at `train.rdzv_endpoint`, the FIRST
machine's host:port, with a static rendezvous: node_rank N holds ranks N × nproc_per_node and up,
so rank 0, the one writer, is always on machine 0. Machine 0 runs the stage as usual (its lock,
its output, the commit); every other machine trains its share into a local directory of its own
that nothing reads, commits nothing, and `launch()` returns None there (the stage then waits for
machine 0's commit). Every rank reports its host name; rank 0 passes the list (by rank) to
`launch(on_world=...)`, and the stage records it in the manifest. On CPU, gloo binds to the address
the host name resolves to: set GLOO_SOCKET_IFNAME to the interface the machines share if it does
not resolve to one (e.g. `eth0`). By hand, on machine N (N = 0, 1):

    python -m torch.distributed.run --nnodes 2 --nproc-per-node 1 --node-rank N --rdzv-backend static \\
        --rdzv-endpoint MACHINE0:29400 -m model.training.distributed ... --out RUN
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from pydantic import ValidationError

from model.data.shards import ShardError
from model.data.vocab import Vocab, VocabularyError
from model.network.checkpoint import CheckpointError, read_state, resolve_checkpoint
from model.network.rnn import ModelConfig
from model.training.loop import (NonFiniteLossError, Ranks, TrainCallbacks, TrainConfig, TrainingStopped, TrainResult,
                                 _parse_overrides, finished_run, resolve_device, train)
from model.training.processes import process_record, running, same_process, start_time

log = logging.getLogger(__name__)

RUNS_DIR_ENV = "HOMER_DDP_RUNS"  # where launch() makes its run directories (default: the temp dir)
MARKER_ENV = "HOMER_DDP_RUN"  # in torchrun's and every rank's environment: which launch they belong to
LAUNCHER_ENV = "HOMER_DDP_LAUNCHER"  # "pid:start time" of the launching process, which the ranks watch
GRACE_S = 30.0  # a stop's wait for the step in progress, and the wait between SIGTERM and SIGKILL (Prefect's own is 30 s)
STEP_EVENTS_S = 0.25  # rank 0 reports its step at most this often
POLL_S = 0.05  # how often launch() replays events and checks for a stop


class DistributedTrainingError(RuntimeError):
    """A rank or torchrun failed; last/ holds the last committed step, and a retry resumes from it."""


# ------------------------------------------------------------------ inside each rank


class DDPRanks(Ranks):
    """The loop's hooks (see loop.Ranks) for DDP over torch.distributed's default process group."""

    def __init__(self, rank: int, size: int, device: torch.device):
        self.rank, self.size, self.dev = rank, size, device

    def device(self, name: str) -> torch.device:
        return self.dev

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.dev.index] if self.dev.type == "cuda" else None)

    def share(self, rows: np.ndarray) -> np.ndarray:
        return np.array_split(rows, self.size)[self.rank]

    def batch(self, idx: np.ndarray) -> tuple[np.ndarray, float]:
        """The rank's contiguous slice of the global batch; its mean loss is weighted by len(slice) × W / len(batch).

        DDP averages the ranks' gradients, so with equal slices (every full batch) the weight is 1.
        An epoch's last, smaller batch may split unevenly, or leave a rank nothing: that rank
        trains on a stand-in window with weight 0 (DDP needs every rank's backward pass).
        """
        mine = np.array_split(idx, self.size)[self.rank]
        if not len(mine):
            return idx[:1], 0.0
        return mine, len(mine) * self.size / len(idx)

    def reseed(self, seed: int, epoch: int, step: int) -> None:
        torch.manual_seed(int(np.random.SeedSequence([seed, epoch, step, self.rank]).generate_state(1, np.uint64)[0]))

    def any(self, flag: bool) -> bool:
        return self.max(int(flag)) > 0

    def max(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        return self.sum(values) / self.size  # gloo has no AVG

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def barrier(self) -> None:
        if self.dev.type == "cuda":
            dist.barrier(device_ids=[self.dev.index])
        else:
            dist.barrier()


def rank_device(name: str, local_rank: int) -> torch.device:
    """The rank's device: `cuda:LOCAL_RANK` for cuda (or auto with CUDA), else what `name` says."""
    device = resolve_device(name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


class _Stop:
    """The first stop signal this rank received (0: none); set by SIGTERM/SIGINT or by the watchdog."""

    def __init__(self):
        self.signum = 0

    def request(self, signum: int) -> None:
        self.signum = self.signum or int(signum)

    def requested(self) -> bool:
        return self.signum != 0


def _watch(stop: _Stop, parent: int, launcher: str | None, grace_s: float) -> None:
    """Stop when torchrun (our parent) or the launcher dies; end this process if the stop has not ended it after grace_s."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent or (launcher and not same_process(launcher)):
            log.warning("torchrun or the launcher is gone: stopping")
            stop.request(signal.SIGTERM)
            time.sleep(grace_s)
            os._exit(128 + signal.SIGTERM)


class _Events:
    """Rank 0's events for the launcher (events.jsonl: one JSON object a line)."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8", buffering=1)
        self.stepped_at = 0.0

    def write(self, kind: str, **data) -> None:
        self.file.write(json.dumps({"kind": kind, **data}) + "\n")

    def step(self, step: int, epoch: int) -> None:
        if time.monotonic() - self.stepped_at >= STEP_EVENTS_S:
            self.stepped_at = time.monotonic()
            self.write("step", step=step, epoch=epoch)

    def callbacks(self, should_stop: Callable[[], bool]) -> TrainCallbacks:
        return TrainCallbacks(on_log=lambda m: self.write("log", entry=m), on_eval=lambda m: self.write("eval", entry=m),
                              on_epoch_end=lambda m: self.write("epoch", entry=m),
                              on_checkpoint=lambda kind, path: self.write("checkpoint", which=kind, path=str(path)),
                              should_stop=should_stop, on_step=self.step)


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


def run_rank(*, model_config: ModelConfig, train_config: TrainConfig, shards_dir, out_dir, vocab: Vocab, init_from=None,
             run_dir: Path | None = None) -> int:
    """One rank of a torchrun job (RANK, WORLD_SIZE, LOCAL_RANK in the environment); returns its exit code."""
    rank, size, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    stop = _Stop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stop.request(signum))
    if run_dir is not None:
        _write_json(run_dir / f"rank-{rank}.pid", {"pid": os.getpid(), "start": start_time(os.getpid()), "rank": rank})
    threading.Thread(target=_watch, args=(stop, os.getppid(), os.environ.get(LAUNCHER_ENV), GRACE_S), daemon=True,
                     name="homer-watchdog").start()
    events = _Events(run_dir / "events.jsonl") if run_dir is not None and rank == 0 else None
    callbacks = events.callbacks(stop.requested) if events else TrainCallbacks(should_stop=stop.requested)
    try:
        if train_config.world_size != size:
            raise ValueError(f"train.nproc_per_node × nnodes = {train_config.nproc_per_node} × {train_config.nnodes} but "
                             f"torchrun started {size} processes; make them agree")
        device = rank_device(train_config.device, local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
        ranks = DDPRanks(rank, size, device)
        hosts: list = [None] * size
        dist.all_gather_object(hosts, socket.gethostname())  # where each rank runs, by rank (for the manifest)
        if events is not None:
            events.write("world", hosts=hosts)
        result = train(model_config=model_config, train_config=train_config, shards_dir=shards_dir, out_dir=out_dir,
                       vocab=vocab, init_from=init_from, callbacks=callbacks, ranks=ranks)
    except TrainingStopped as exc:
        signum = ranks.max(stop.signum) or signal.SIGTERM  # every rank exits with the same code
        log.warning("%s", exc)
        if rank == 0 and run_dir is not None:
            _write_json(run_dir / "stopped.json", {"step": exc.step, "checkpoint": str(exc.checkpoint), "signal": signum})
        code = 128 + signum
    except BaseException as exc:  # the peers may be gone: no barrier, let torchrun see the failure
        if run_dir is not None:
            _write_json(run_dir / f"error-{rank}.json", {"type": type(exc).__name__, "message": str(exc),
                                                         "step": getattr(exc, "step", None), "value": getattr(exc, "value", None)})
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    else:
        if rank == 0:
            if run_dir is not None:
                _write_json(run_dir / "result.json", asdict(result))
            else:
                print(json.dumps(asdict(result)), flush=True)
        code = 0
    ranks.barrier()  # before destroying the group: without it a gloo rank may abort while a peer still talks to it
    dist.destroy_process_group()
    return code


# ------------------------------------------------------------------ the launcher


def torchrun_args(cfg: TrainConfig, rdzv_id: str) -> list[str]:
    """torchrun's options for a TrainConfig: its world, a rendezvous, and no restarts (a Prefect retry resumes instead)."""
    args = ["--nproc-per-node", str(cfg.nproc_per_node), "--nnodes", str(cfg.nnodes), "--max-restarts", "0"]
    if cfg.rdzv_endpoint is None:
        return args + ["--standalone"]  # a c10d rendezvous on a free local port
    # A static rendezvous (a store at machine 0's endpoint): node_rank N gets ranks from N × nproc_per_node,
    # so rank 0, the one writer, runs on machine 0 (c10d's dynamic one orders machines by address and PID).
    return args + ["--rdzv-backend", "static", "--rdzv-endpoint", cfg.rdzv_endpoint, "--node-rank", str(cfg.node_rank),
                   "--rdzv-id", cfg.rdzv_id or rdzv_id]


def launch(*, model_config: ModelConfig, train_config: TrainConfig, shards_dir, out_dir, vocab: Vocab, init_from=None,
           callbacks: TrainCallbacks | None = None, grace_s: float = GRACE_S,
           on_world: Callable[[list[str]], None] | None = None) -> TrainResult | None:
    """Train with `train_config.world_size` processes under torchrun; `loop.train()`'s contract (see the module docstring).

    Returns rank 0's TrainResult (or the finished run in out_dir), or None on a machine with
    `train_config.node_rank` > 0 (rank 0, and the result, are on machine 0); calls
    `on_world(hosts)` with each rank's host name, by rank, once they have met. Raises TrainingStopped after a
    stop, the rank's own error for a final one (a NaN, a bad checkpoint or shard, a ValueError),
    else DistributedTrainingError. Every process it started has ended when it returns or raises.
    """
    out_dir = Path(out_dir).absolute()
    if (done := finished_run(out_dir, vocab, model_config)) is not None:
        return done
    callbacks = callbacks or TrainCallbacks()
    runs = Path(os.environ.get(RUNS_DIR_ENV) or tempfile.gettempdir())
    runs.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="homer-ddp-", dir=runs))
    _write_json(run_dir / "config.json", {"model": model_config.model_dump(mode="json"), "train": train_config.model_dump(mode="json")})
    vocab.save(run_dir / "vocab.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(train_config, f"homer-{out_dir.name}"),
           "-m", "model.training.distributed", "--config", str(run_dir / "config.json"), "--vocab", str(run_dir / "vocab.json"),
           "--shards", str(Path(shards_dir).absolute()), "--out", str(out_dir), "--run-dir", str(run_dir),
           *(["--init-from", str(Path(init_from).absolute())] if init_from is not None else [])]
    env = dict(os.environ, **{MARKER_ENV: run_dir.name, LAUNCHER_ENV: process_record(),
                              "PYTHONUNBUFFERED": "1"})
    env.setdefault("OMP_NUM_THREADS", "1")  # each rank sets its own thread count (CoreShare); this silences torchrun's notice
    root = Path(__file__).resolve().parents[2]  # where `model` is imported from: a checkout (installed packages need nothing)
    if not {"site-packages", "dist-packages"} & set(root.parts):
        env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
    log.info("training with %d processes (torchrun); run directory %s", train_config.world_size, run_dir)
    with open(run_dir / "torchrun.log", "wb") as output:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                start_new_session=True)
    replay = _Replay(run_dir / "events.jsonl", callbacks, on_world)
    stopping, signalled = None, set()
    try:
        while proc.poll() is None:
            replay.pump()
            if stopping is None and callbacks.should_stop is not None and callbacks.should_stop():
                stopping = time.monotonic()
            if stopping is not None:  # pass the stop on to every rank (once each; a rank that comes up later too)
                for pid in _ranks_alive(run_dir, run_dir.name, exclude={proc.pid}) - signalled:
                    _kill(pid, signal.SIGTERM)
                    signalled.add(pid)
                if time.monotonic() - stopping > grace_s:
                    break  # the step in progress takes too long: _end() kills them; last/ holds the last committed step
            time.sleep(POLL_S)
        replay.pump()
    finally:  # a stop that outlasted its grace has had its SIGTERM: straight to SIGKILL
        _end(proc, run_dir, 0.0 if stopping is not None and time.monotonic() - stopping > grace_s else grace_s)
    if proc.returncode == 0 and train_config.node_rank > 0 and stopping is None:  # machine 0 holds rank 0 and its result
        _remove(run_dir)
        return None
    return _outcome(proc.returncode, run_dir, out_dir, stopped=stopping is not None)


class _Replay:
    """Calls the launcher's callbacks for the events rank 0 appends to events.jsonl."""

    def __init__(self, path: Path, callbacks: TrainCallbacks, on_world: Callable[[list[str]], None] | None = None):
        self.path, self.callbacks, self.offset, self.partial = path, callbacks, 0, b""
        self.on_world = on_world

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        cb = self.callbacks
        for line in lines:
            event = json.loads(line)
            kind = event["kind"]
            if kind == "step" and cb.on_step:
                cb.on_step(event["step"], event["epoch"])
            elif kind == "world":
                if self.on_world:
                    self.on_world(event["hosts"])
            elif kind == "checkpoint" and cb.on_checkpoint:
                cb.on_checkpoint(event["which"], Path(event["path"]))
            elif (handler := {"log": cb.on_log, "eval": cb.on_eval, "epoch": cb.on_epoch_end}.get(kind)) is not None:
                handler(event["entry"])


def _end(proc: subprocess.Popen, run_dir: Path, grace_s: float) -> None:
    """End torchrun and every rank still alive: SIGTERM (a rank saves last/ if it can), then SIGKILL after grace_s."""
    left = _ranks_alive(run_dir, run_dir.name, exclude={proc.pid})
    if proc.poll() is None or left:
        for pid in left:
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (proc.poll() is None or _ranks_alive(run_dir, run_dir.name, exclude={proc.pid})):
            time.sleep(0.1)
        for pid in _ranks_alive(run_dir, run_dir.name, exclude={proc.pid}):
            _kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # torchrun's own session
            except ProcessLookupError:
                pass
    proc.wait()


FINAL_ERRORS: dict[str, Callable[[dict], Exception]] = {  # a retry would fail the same way (tasks/train.py's NO_RETRY)
    "NonFiniteLossError": lambda e: NonFiniteLossError(e["step"], e["value"]),
    "CheckpointError": lambda e: CheckpointError(e["message"]),
    "ShardError": lambda e: ShardError(e["message"]),
    "VocabularyError": lambda e: VocabularyError(e["message"]),
    "ValueError": lambda e: ValueError(e["message"]),
}


def _outcome(returncode: int, run_dir: Path, out_dir: Path, stopped: bool) -> TrainResult:
    """What the ranks left in run_dir, as the result or the exception of launch()."""
    if (run_dir / "result.json").is_file() and returncode == 0:
        result = TrainResult(**json.loads((run_dir / "result.json").read_text(encoding="utf-8")))
        _remove(run_dir)
        return result
    committed = resolve_checkpoint(out_dir / "last")
    step = read_state(committed)["step"] if committed else 0
    if (run_dir / "stopped.json").is_file() or stopped:
        _remove(run_dir)
        raise TrainingStopped(step, out_dir / "last")
    errors = {int(p.stem.split("-")[1]): json.loads(p.read_text(encoding="utf-8")) for p in run_dir.glob("error-*.json")}
    for rank in sorted(errors):
        if errors[rank]["type"] in FINAL_ERRORS:  # every rank meets it (a NaN is agreed on): no retry helps
            raise FINAL_ERRORS[errors[rank]["type"]](errors[rank])
    root = _root_cause(run_dir / "torchrun.log")
    rank = root.get("rank", min(errors, default=None))
    if m := re.match(r"(-?\d+)\s*\(pid:\s*(\d+)\)", root.get("exitcode", "")):
        code, pid = int(m[1]), m[2]
        cause = (f"rank {rank} (pid {pid}) was killed by {_signal_name(-code)}" if code < 0 else
                 f"rank {rank} (pid {pid}) exited with {code}")
    else:
        cause = "torchrun failed" if rank is None else f"rank {rank} failed"
    if rank in errors:
        cause += f": {errors[rank]['type']}: {errors[rank]['message']}"
    elif errors:
        first = min(errors)
        cause += f"; then rank {first}: {errors[first]['type']}: {errors[first]['message'][:200]}"
    elif not m:
        cause += f"; the end of its log:\n{root.get('tail', '')}"
    where = (f"last/ holds step {step}, and a retry resumes from it" if committed else
             "no step was committed yet (no last/), so a retry starts over")
    raise DistributedTrainingError(
        f"training with {len(rank_pids(run_dir)) or 'several'} processes failed (torchrun exited with {returncode}): {cause}. "
        f"{where}. torchrun's log: {run_dir / 'torchrun.log'}")


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _root_cause(log_path: Path) -> dict:
    """The first failure that no one else caused: {"rank": int, "exitcode": str, "traceback": its first line}, else {"tail": ...}.

    torchrun names as root cause the failure with the earliest timestamp, in whole seconds, and
    a rank that wrote an error file (a peer's lost connection) can tie with or precede the rank
    that was killed from outside, which has none. A rank ended by a signal other than SIGTERM
    (SIGTERM is what the agent and launch() send to the ranks still alive) is therefore the cause
    wherever it is listed; otherwise torchrun's own choice.
    """
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return {"tail": "(no log)"}
    failures, root = [], None
    for i, line in enumerate(lines):
        if re.match(r"\s*\[\d+\]:\s*$", line):  # one failure's block: "[idx]:" then "  key : value" lines
            found = {}
            for entry in lines[i + 1:i + 9]:
                if m := re.match(r"\s*(rank|exitcode|traceback)\s*:\s*(.*)$", entry):
                    found.setdefault(m[1], m[2].strip())
            if "rank" in found:
                found["rank"] = int(found["rank"].split()[0])
                failures.append(found)
                if any("Root Cause" in earlier for earlier in lines[max(0, i - 2):i]):
                    root = found
    for found in failures:
        if m := re.match(r"-(\d+)\s*\(pid", found.get("exitcode", "")):
            if int(m[1]) != signal.SIGTERM:
                return found
    return root or (failures[0] if failures else {"tail": "\n".join(lines[-20:])})


def _remove(run_dir: Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)


# ------------------------------------------------------------------ processes, by PID


def rank_pids(run_dir: Path) -> dict[int, dict]:
    """rank -> {"pid", "start", "rank"} as each rank recorded itself in run_dir."""
    found = {}
    for path in Path(run_dir).glob("rank-*.pid"):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        found[record["rank"]] = record
    return found


def _marked(marker: str) -> set[int]:
    """PIDs of running processes whose environment says they belong to this launch (torchrun and its ranks)."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = set()
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0") and running(int(entry.name)):
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def _ranks_alive(run_dir: Path, marker: str, exclude: set[int]) -> set[int]:
    """The ranks (and any other process of this launch but `exclude`) still running."""
    recorded = {r["pid"] for r in rank_pids(run_dir).values() if same_process(f"{r['pid']}:{r['start']}")}
    return (recorded | _marked(marker)) - exclude


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------ command line


def _configs(args) -> tuple[ModelConfig, TrainConfig]:
    """--config FILE.json ({"model": ..., "train": ...}) and then --set overrides; under torchrun by hand the world comes from it."""
    base = json.loads(Path(args.config).read_text(encoding="utf-8")) if args.config else {"model": {}, "train": {}}
    sets = _parse_overrides(args.set)
    model, train_cfg = {**base.get("model", {}), **sets["model"]}, {**base.get("train", {}), **sets["train"]}
    if "LOCAL_WORLD_SIZE" in os.environ and not args.config:
        local, world = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["WORLD_SIZE"])
        train_cfg.setdefault("nproc_per_node", local)
        train_cfg.setdefault("nnodes", world // local)
    return ModelConfig(**model), TrainConfig(**train_cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.training.distributed", description=__doc__.split("\n")[0])
    parser.add_argument("--shards", required=True, help="directory of one corpus's train-/val- shards")
    parser.add_argument("--vocab", required=True, help="the vocab.json the shards were built with")
    parser.add_argument("--out", required=True, help="run directory (last/, best/, metrics.jsonl); resumed if present")
    parser.add_argument("--init-from", help="checkpoint directory to take the initial weights from (fine-tuning)")
    parser.add_argument("--config", help="JSON file {\"model\": {...}, \"train\": {...}} (what launch() writes)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override train.<field> or model.<field>")
    parser.add_argument("--run-dir", help="(launch() sets it) where the ranks record PIDs, events and the outcome")
    args = parser.parse_args(argv)
    try:
        model_config, train_config = _configs(args)
    except (ValueError, ValidationError) as exc:
        parser.error(str(exc))
    under_torchrun = "RANK" in os.environ and "LOCAL_RANK" in os.environ
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s [rank {rank}] %(message)s" if under_torchrun else "%(asctime)s %(levelname)s %(message)s")
    common = dict(model_config=model_config, train_config=train_config, shards_dir=args.shards, out_dir=args.out,
                  vocab=Vocab.load(args.vocab), init_from=args.init_from)
    if under_torchrun:
        return run_rank(**common, run_dir=Path(args.run_dir) if args.run_dir else None)
    stop: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stop.append(signum))
    try:
        result = launch(**common, callbacks=TrainCallbacks(should_stop=lambda: bool(stop)))
    except TrainingStopped as exc:
        log.warning("%s", exc)
        return 128 + (stop[0] if stop else signal.SIGTERM)
    except DistributedTrainingError as exc:
        log.error("%s", exc)
        return 1
    if result is not None:  # None: a machine other than the first (node_rank > 0), which has no result
        print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    code = record(main)()  # an exception is written where torchrun reports it, and ends the process as usual
    if "LOCAL_RANK" in os.environ:  # a rank that ended normally: everything is written; skip the interpreter's
        logging.shutdown()  # teardown, which takes seconds with torch loaded (each launch waits for it)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
