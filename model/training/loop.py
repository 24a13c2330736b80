"""The one training loop, for pretraining and fine-tuning, with true resume.

`train()` reads the train/val shards, trains a CharRNN with Adam, and writes into `out_dir`:

    last/          checkpoint every `checkpoint_every_steps`, at each epoch end and at the end
    best/          checkpoint at the best validation loss so far
    metrics.jsonl  one JSON object per log / eval / epoch event

The loop reads top to bottom: `train()` returns a finished run or calls `start()` (data,
model, optimizer, and `resume()` from last/), then `run_epoch()` until the epochs or the
step budget end: each batch is one `train_step()`, with `log_progress()`, `validate()`
(best/, early stopping) and `save()` (last/) on their intervals, and `end_epoch()` at the
end of each. Their shared state is a typed `Session`; what state.json carries is `RunState`.

If `out_dir/last/` exists the run continues from it exactly (weights, optimizer, step,
position in the epoch, LR, RNG states): on CPU the final weights are bit-for-bit those of
an uninterrupted run. A finished run is returned as is. Fine-tuning is `init_from=<checkpoint
dir>`: its weights, a fresh optimizer and its own TrainConfig.

Several processes (DDP) run this same loop, one per rank: `ranks=` (a `Ranks`) is the handful of
hooks where they split the work or must agree (each rank's slice of the global batch, a per-step
reseed, the mean of the logged losses, the sums of the validation scores, the stop flag, a
barrier after rank 0 writes). The default `Ranks()` is one process, and there every hook does
nothing. model/training/distributed.py provides the DDP ranks and launches them under torchrun.

Run it directly (Ctrl-C or SIGTERM saves last/ and stops; run again to resume):

    python -m model.training.loop --shards data/prepare/<fp>/shards/homer --vocab data/prepare/<fp>/vocab.json \\
        --out /tmp/run --set epochs=2 --set model.hidden_sizes=[64,64] [--init-from CKPT_DIR]
"""

from __future__ import annotations

import argparse
import atexit
import contextvars
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from model.network.checkpoint import (check_compatible, load_checkpoint, read_state, resolve_checkpoint, rng_snapshot,
                                     save_checkpoint)
from model.network.rnn import CharRNN, ModelConfig, build_model
from model.training.config import FinetuneTrainConfig, TrainConfig  # noqa: F401 (defined there, torch-free; imported from here too)
from model.training.overrides import apply_sets
from model.training.threads import CoreShare
from model.data.shards import ShardError, SplitWindows, open_split, read_overlap, read_target_chars
from model.data.vocab import Vocab

log = logging.getLogger(__name__)


class TrainingStopped(Exception):
    """should_stop() asked to stop; last/ holds the position to resume from."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"training stopped on request after step {step}; resume from {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; last/ still holds the previous good checkpoint."""

    def __init__(self, step: int, value: float):
        super().__init__(f"training loss (or gradient norm) is {value} at step {step}; lower the learning rate, "
                         f"or resume from the last good checkpoint")
        self.step, self.value = step, value


@dataclass
class TrainCallbacks:
    on_log: Callable[[dict], None] | None = None  # {step, epoch, loss, chars_per_s, lr}
    on_eval: Callable[[dict], None] | None = None  # {step, epoch, val_loss, val_bpc, val_ppl, best_val_loss, improved}
    on_epoch_end: Callable[[dict], None] | None = None  # {epoch, step, lr, train_loss, val_loss, val_bpc, val_ppl, best_val_loss}
    on_checkpoint: Callable[[str, Path], None] | None = None  # ("last" | "best", directory)
    should_stop: Callable[[], bool] | None = None  # checked before every step
    on_step: Callable[[int, int], None] | None = None  # (step, epoch) after every optimizer step: a live progress line


@dataclass
class TrainResult:
    steps: int
    epochs: int  # completed epochs
    best_val_loss: float | None  # nats/char
    best_val_bpc: float | None
    last_val_loss: float | None
    history: list[dict]  # one on_epoch_end dict per completed epoch
    train_chars_per_s: float  # over all runs of this out_dir, eval and checkpoint time excluded
    stopped_early: bool
    resumed_from_step: int | None


def lr_at_epoch(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of 0-based `epoch`: constant, then x exp(-0.1) per epoch after constant_epochs."""
    return cfg.learning_rate * math.exp(-0.1 * max(0, epoch - cfg.constant_epochs + 1))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the n training windows in an epoch: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def resolve_device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


class Ranks:
    """The processes that train together, as one of them sees them: by default this one alone.

    The loop calls these hooks where several processes split the work or must agree; here, in
    one process, each does nothing (the loop runs exactly as it would without them).
    model/training/distributed.py's DDPRanks implements them with torch.distributed.
    """

    rank, size = 0, 1

    def device(self, name: str) -> torch.device:
        return resolve_device(name)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The module to train through (DDP's wrapper), or None to train `model` itself."""
        return None

    def share(self, rows: np.ndarray) -> np.ndarray:
        """This process's contiguous part of `rows` (the validation windows)."""
        return rows

    def batch(self, idx: np.ndarray) -> tuple[np.ndarray, float]:
        """This process's slice of a global batch's window indices, and the weight of its mean loss."""
        return idx, 1.0

    def reseed(self, seed: int, epoch: int, step: int) -> None:
        """Seed the RNGs before a step (dropout masks), where their state is not carried by the checkpoint."""

    def any(self, flag: bool) -> bool:
        """True on every process when `flag` is true on any."""
        return flag

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise mean of `values` over the processes."""
        return values

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `values` over the processes."""
        return values

    def barrier(self) -> None:
        """Wait until every process gets here."""


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    `auto` is fp32 everywhere (TF32 on CUDA through allow_tf32): bf16 autocast stays an
    explicit choice until a GPU run has shown it reaches the fp32 loss, faster.
    """
    if precision == "auto":
        return None
    if precision != "fp32" and device.type != "cuda":
        raise ValueError(f"precision={precision} needs a CUDA device (mixed precision runs on CUDA only); "
                         f"use precision=auto or fp32 on {device}")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def read_windows(shards_dir, split: str, vocab: Vocab) -> SplitWindows:
    """A split's windows, (N, seq_len + 1) uint16 or uint32 and memory-mapped (open_split), after checking they use `vocab`."""
    windows = open_split(shards_dir, split)
    meta = windows.meta
    if meta.get("vocab_fingerprint") != vocab.fingerprint:
        raise ShardError(f"shards {shards_dir} were built with vocabulary {meta.get('vocab_fingerprint')} but the "
                         f"vocabulary given is {vocab.fingerprint}; re-run prepare or pass the shards' vocab.json")
    if not len(windows):
        raise ShardError(f"shards {shards_dir}: the {split} split has no windows; the corpus is too small for seq_len "
                         f"{meta.get('seq_len')}")
    return windows


def batch_loss(model: CharRNN, batch: torch.Tensor, amp: torch.dtype | None, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy in nats of predicting batch[:, 1:] from batch[:, :-1]; batch (B, T + 1) long."""
    with torch.autocast(batch.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        logits, _ = model(batch[:, :-1])  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction=reduction)


def scored_targets(windows: np.ndarray, overlap: np.ndarray | None = None) -> int:
    """How many targets (tokens) an evaluation of these windows scores: each once."""
    return int(windows.shape[0] * (windows.shape[1] - 1) - (0 if overlap is None else overlap.sum(dtype=np.int64)))


def scored_chars(windows: np.ndarray, overlap: np.ndarray | None = None, target_chars: np.ndarray | None = None) -> int:
    """How many characters an evaluation of these windows covers: the sum of the windows' target_chars (word, bpe:
    read_target_chars), else one per scored target (char)."""
    return scored_targets(windows, overlap) if target_chars is None else int(target_chars.sum(dtype=np.int64))


class EvaluationStopped(Exception):
    """should_stop() asked to stop in the middle of an evaluation."""


@torch.no_grad()
def evaluate(model: CharRNN, windows: np.ndarray, *, batch_size: int, device: torch.device,
             amp: torch.dtype | None = None, overlap: np.ndarray | None = None,
             should_stop: Callable[[], bool] | None = None, computing: Callable = nullcontext,
             all_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None, target_chars: np.ndarray | None = None) -> float:
    """Loss in nats per character: the summed loss of every scored target over the characters they cover.

    windows (N, T + 1); overlap (N,) skips each window's leading targets that an earlier
    window of its document already scored, so every token counts once; target_chars (N,)
    gives the characters each window's scored targets cover (word and BPE shards), else
    each target is one character. With several processes each scores its part of the
    windows and `all_ranks` sums (nll, chars) over them.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    positions = torch.arange(windows.shape[1] - 1, device=device)  # (T,)
    for i in range(0, len(windows), batch_size):
        if should_stop is not None and should_stop():  # a large validation set must not delay a cancel
            model.train(was_training)
            raise EvaluationStopped
        batch = torch.from_numpy(windows[i:i + batch_size].astype(np.int64)).to(device)  # (B, T + 1)
        with computing():
            if overlap is None:
                total += batch_loss(model, batch, amp, reduction="sum")
                continue
            skip = torch.from_numpy(overlap[i:i + batch_size].astype(np.int64)).to(device)  # (B,)
            losses = batch_loss(model, batch, amp, reduction="none").view(len(batch), -1)  # (B, T)
            total += losses.masked_fill(positions[None, :] < skip[:, None], 0.0).sum(dtype=torch.float64)
    model.train(was_training)
    if all_ranks is not None:
        total, chars = all_ranks(torch.stack([total, total.new_tensor(float(scored_chars(windows, overlap, target_chars)))])).tolist()
        return total / chars
    return total.item() / scored_chars(windows, overlap, target_chars)


class _Stopwatch:
    """Training seconds: wall time minus the time spent inside paused() blocks."""

    def __init__(self, offset: float):
        self.start, self.pauses = time.perf_counter() - offset, 0.0

    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.pauses

    @contextmanager
    def paused(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.pauses += time.perf_counter() - t


def _append_jsonl(path: Path, entry: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def _truncate_jsonl(path: Path, step: int) -> None:
    """Drop metric entries past `step` (and a torn last line) before a resumed run appends."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class RunMetrics:
    """Running sums and the best validation so far; saved in state.json as `metrics`."""

    best_val_loss: float | None = None  # nats/char
    best_val_bpc: float | None = None
    best_step: int | None = None
    last_val_loss: float | None = None
    last_eval_step: int | None = None
    bad_evals: int = 0  # validations in a row without a new best (early stopping)
    epoch_loss_sum: float = 0.0  # training loss summed over this epoch's flushed steps
    epoch_loss_steps: int = 0
    log_loss_sum: float = 0.0  # ... and since the last log entry
    log_loss_steps: int = 0
    train_chars: int = 0  # characters trained on, over every run of this out_dir
    train_seconds: float = 0.0  # training time, eval and checkpoint time excluded


@dataclass
class RunState:
    """Where a run is: what state.json carries besides what save_checkpoint adds (RNG, configs)."""

    train_config: dict  # the TrainConfig this run trains with
    init_from: str | None = None  # the checkpoint the weights started from (fine-tuning)
    step: int = 0  # optimizer steps done
    epoch: int = 0  # 0-based epoch in progress (= epochs completed)
    batch_in_epoch: int = 0  # batches of that epoch already trained
    lr: float = 0.0
    done: bool = False
    stopped_early: bool = False
    metrics: RunMetrics = field(default_factory=RunMetrics)
    history: list[dict] = field(default_factory=list)  # one epoch entry per completed epoch
    grad_scaler: dict | None = None  # fp16's GradScaler state
    validation_pending: bool = False  # a stop interrupted the validation at `step`: it runs first on resume

    @classmethod
    def from_saved(cls, saved: dict) -> "RunState":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names and k != "metrics"}, metrics=RunMetrics(**saved["metrics"]))

    def to_json(self) -> dict:
        return asdict(self)

    def result(self, resumed_from_step: int | None) -> TrainResult:
        m = self.metrics
        return TrainResult(
            steps=self.step, epochs=self.epoch, best_val_loss=m.best_val_loss, best_val_bpc=m.best_val_bpc,
            last_val_loss=m.last_val_loss, history=self.history,
            train_chars_per_s=m.train_chars / m.train_seconds if m.train_seconds else 0.0,
            stopped_early=self.stopped_early, resumed_from_step=resumed_from_step,
        )


class _Abandoned(Exception):
    """Raised in the training thread when the watching thread already saved last/ and stopped the run."""


@dataclass
class Boundary:
    """Lets the thread that watches for a stop save last/ while the training thread is inside a slow computation.

    The training thread holds `lock` always except inside `computing()`: forward and backward
    passes and validation batches, which change neither the weights, the optimizer nor the run
    state. So whoever holds the lock sees a step boundary; `rng` holds the RNG states of
    that boundary (the computation draws dropout masks).
    """

    lock: threading.Lock = field(default_factory=threading.Lock)
    rng: tuple | None = None  # rng_snapshot() at the start of the computation in progress
    kind: str = "step"  # what is being computed: "step" or "validation"
    abandoned: bool = False  # last/ was saved from the boundary; the training thread must not touch anything again


@dataclass
class Session:
    """Everything one call of train() works with: the configs, the data, the live objects and the run state."""

    cfg: TrainConfig
    model_config: ModelConfig
    vocab: Vocab
    callbacks: TrainCallbacks
    out_dir: Path
    train_w: np.ndarray  # (N, T + 1) uint16 (uint32 past 65,536 entries) training windows
    val_w: np.ndarray  # (M, T + 1) uint16 (or uint32) validation windows
    val_overlap: np.ndarray  # (M,) targets of each val window already scored by the one before
    device: torch.device
    amp: torch.dtype | None
    model: CharRNN
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    run: RunState
    resumed_from: int | None = None
    clock: _Stopwatch | None = None
    pending: list = field(default_factory=list)  # step losses not yet copied to the host (one sync per flush)
    logged_chars: int = 0  # train_chars at the last log entry, for chars/s
    logged_seconds: float = 0.0
    stop: bool = False
    cores: CoreShare | None = None  # keeps torch's thread count at this run's share of the machine
    boundary: Boundary | None = None  # set when a stop may come from another thread (see run_stoppable)
    ranks: Ranks = field(default_factory=Ranks)  # the processes training together (one by default)
    ddp: torch.nn.Module | None = None  # the DDP wrapper that training steps go through, when there are several
    val_chars: np.ndarray | None = None  # (M,) characters each val window's scored targets cover (word, bpe); None: one per target

    @property
    def trained(self) -> torch.nn.Module:
        """What a training step runs: the model, or its DDP wrapper (which averages the gradients over the ranks)."""
        return self.model if self.ddp is None else self.ddp

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    @property
    def n_batches(self) -> int:
        return math.ceil(len(self.train_w) / self.cfg.batch_size)


def finished_run(out_dir: Path, vocab: Vocab, model_config: ModelConfig) -> TrainResult | None:
    """The result of a run that already finished in out_dir (checked against vocab and architecture), else None."""
    previous = resolve_checkpoint(out_dir / "last")
    if previous is None:
        return None
    saved = read_state(previous)
    check_compatible(saved, vocab=vocab, model_config=model_config)
    if not saved["done"]:
        return None
    log.info("%s holds a finished run (step %d); not training again", out_dir, saved["step"])
    return RunState.from_saved(saved).result(saved["step"])


def start(*, model_config: ModelConfig, cfg: TrainConfig, shards_dir, out_dir: Path, vocab: Vocab, init_from,
          callbacks: TrainCallbacks, ranks: Ranks | None = None) -> Session:
    """Read the data, build the model and optimizer, and resume from last/ (or start from init_from).

    With several ranks each reads every window (the global batches are sliced per step), keeps its
    part of the validation windows, resumes from the same last/, and trains through DDP.
    """
    ranks = ranks or Ranks()
    # Training reads train and val only: the test split never chooses a model.
    train_w, val_w = read_windows(shards_dir, "train", vocab), read_windows(shards_dir, "val", vocab)
    val_overlap = read_overlap(shards_dir, "val")
    val_chars = read_target_chars(shards_dir, "val")  # None for character shards
    keep = np.arange(len(val_w))  # the validation windows are read into memory: each validation reads them all
    if cfg.max_val_windows is not None and len(val_w) > cfg.max_val_windows:
        keep = np.linspace(0, len(val_w) - 1, cfg.max_val_windows).round().astype(np.int64)
    val_w, val_overlap = val_w[keep], val_overlap[keep]
    val_w, val_overlap = ranks.share(val_w), ranks.share(val_overlap)
    val_chars = None if val_chars is None else ranks.share(val_chars[keep])
    device = ranks.device(cfg.device)
    amp = resolve_precision(cfg.precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(model_config, vocab.size).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    scaler = torch.amp.GradScaler("cuda", enabled=amp is torch.float16)
    run = RunState(train_config=cfg.model_dump(), init_from=None if init_from is None else str(init_from),
                   lr=lr_at_epoch(cfg, 0))
    s = Session(cfg=cfg, model_config=model_config, vocab=vocab, callbacks=callbacks, out_dir=out_dir, train_w=train_w,
                val_w=val_w, val_overlap=val_overlap, device=device, amp=amp, model=model, optimizer=optimizer,
                scaler=scaler, run=run, ranks=ranks, val_chars=val_chars)
    previous = resolve_checkpoint(out_dir / "last")
    if previous is not None:
        resume(s, previous)
    elif init_from is not None:
        load_checkpoint(init_from, model, vocab=vocab, model_config=model_config)
        log.info("initialised weights from %s", init_from)
    out_dir.mkdir(parents=True, exist_ok=True)
    if ranks.rank == 0:  # the one writer
        for stale in out_dir.glob("*.tmp-*"):  # left by a crash mid-save
            shutil.rmtree(stale, ignore_errors=True)
        _truncate_jsonl(s.metrics_path, s.run.step)
    s.ddp = ranks.wrap(model)  # after resuming: every rank holds the same weights
    s.clock = _Stopwatch(s.run.metrics.train_seconds)
    s.logged_chars, s.logged_seconds = s.run.metrics.train_chars, s.clock.seconds()
    return s


def resume(s: Session, checkpoint: Path) -> None:
    """Continue exactly where last/ stopped: weights, optimizer, RNG states, step, position in the epoch."""
    saved = load_checkpoint(checkpoint, s.model, s.optimizer, vocab=s.vocab, model_config=s.model_config, restore_rng_state=True)
    s.run = RunState.from_saved(saved)
    s.run.train_config = s.cfg.model_dump()
    if s.run.grad_scaler:
        s.scaler.load_state_dict(s.run.grad_scaler)
    s.resumed_from = s.run.step
    changed = sorted(k for k, v in s.cfg.model_dump().items() if saved["train_config"].get(k) != v)
    log.info("resuming %s from step %d (epoch %d, batch %d)", s.out_dir, s.run.step, s.run.epoch + 1, s.run.batch_in_epoch)
    if changed:
        log.warning("resuming with a changed train config (%s); the run is no longer an exact continuation", ", ".join(changed))


@contextmanager
def computing(s: Session, kind: str):
    """Mark a computation that changes no state: the watching thread may save last/ from the step boundary meanwhile."""
    b = s.boundary
    if b is None:
        yield
        return
    b.rng, b.kind = rng_snapshot(), kind
    b.lock.release()
    try:
        yield
    finally:
        b.lock.acquire()
        if b.abandoned:
            raise _Abandoned


def train_step(s: Session, batch: torch.Tensor, weight: float = 1.0, windows: int | None = None) -> None:
    """One optimizer step on batch (B, T + 1); its loss stays on the device until the next flush.

    With several processes `batch` is this rank's slice of a global batch of `windows` windows,
    and `weight` scales its mean loss so that DDP's mean of the ranks' gradients is the gradient
    of the global batch's mean loss (1 when the slices are equal; see DDPRanks.batch).
    """
    with computing(s, "step"):
        loss = batch_loss(s.trained, batch, s.amp)
        if weight != 1.0:
            loss = loss * weight
        s.optimizer.zero_grad(set_to_none=True)
        s.scaler.scale(loss).backward()
    s.scaler.unscale_(s.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.cfg.grad_clip)
    s.scaler.step(s.optimizer)
    s.scaler.update()
    # + 0 * grad_norm: the loss, or NaN when the gradient was not finite (the GradScaler
    # skips such steps itself, so only without it does that poison the weights)
    s.pending.append(loss.detach() if s.scaler.is_enabled() else loss.detach() + 0 * grad_norm)
    s.run.step += 1
    s.run.metrics.train_chars += (len(batch) if windows is None else windows) * (batch.shape[1] - 1)


def flush(s: Session) -> None:
    """Copy the pending step losses to the host at once; a NaN or infinite one stops the run."""
    if not s.pending:
        return
    values = s.ranks.mean(torch.stack(s.pending)).tolist()  # the global batches' losses, the same on every rank
    first = s.run.step - len(s.pending) + 1
    s.pending.clear()
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise NonFiniteLossError(first + i, v)
    m = s.run.metrics
    m.epoch_loss_sum += sum(values)
    m.epoch_loss_steps += len(values)
    m.log_loss_sum += sum(values)
    m.log_loss_steps += len(values)


def emit(s: Session, kind: str, entry: dict, callback) -> None:
    if s.ranks.rank != 0:  # every rank computes the entry; rank 0 writes it
        return
    _append_jsonl(s.metrics_path, {"kind": kind, **entry})
    if callback is not None:
        callback(entry)


def save(s: Session, kind: str, rng: tuple | None = None) -> None:
    """Write last/ or best/ (atomically); its time is not training time. `rng`: the RNG states to record, if not now's.

    With several processes rank 0 writes and the others wait for it at a barrier.
    """
    with s.clock.paused():
        if s.ranks.rank == 0:
            s.run.metrics.train_seconds = s.clock.seconds()
            s.run.grad_scaler = s.scaler.state_dict() if s.scaler.is_enabled() else None
            path = save_checkpoint(s.out_dir / kind, model=s.model, vocab=s.vocab, model_config=s.model_config,
                                   state=s.run.to_json(), optimizer=s.optimizer, rng=rng)
        s.ranks.barrier()
    if s.ranks.rank == 0 and s.callbacks.on_checkpoint is not None:
        s.callbacks.on_checkpoint(kind, path)


def log_progress(s: Session) -> None:
    """A log entry: mean loss and chars/s since the last one."""
    flush(s)
    m, now = s.run.metrics, s.clock.seconds()
    entry = {"step": s.run.step, "epoch": s.run.epoch + 1, "loss": m.log_loss_sum / max(m.log_loss_steps, 1),
             "chars_per_s": (m.train_chars - s.logged_chars) / max(now - s.logged_seconds, 1e-9), "lr": s.run.lr}
    m.log_loss_sum, m.log_loss_steps = 0.0, 0
    s.logged_chars, s.logged_seconds = m.train_chars, now
    log.info("step %d epoch %d loss %.4f %.0f chars/s lr %.2e", entry["step"], entry["epoch"], entry["loss"],
             entry["chars_per_s"], entry["lr"])
    emit(s, "log", entry, s.callbacks.on_log)


def validate(s: Session) -> dict:
    """Evaluate on the validation windows, keep best/, count patience; returns the eval entry."""
    flush(s)
    alone = s.ranks.size == 1  # several ranks score their parts and sum; a stop waits for the validation's end
    try:
        with s.clock.paused():
            loss = evaluate(s.model, s.val_w, batch_size=4 * s.cfg.batch_size // s.ranks.size, device=s.device, amp=s.amp,
                            overlap=s.val_overlap, should_stop=s.callbacks.should_stop if alone else None,
                            computing=lambda: computing(s, "validation"), all_ranks=None if alone else s.ranks.sum,
                            target_chars=s.val_chars)
    except EvaluationStopped:
        s.run.validation_pending = True
        save(s, "last")
        raise TrainingStopped(s.run.step, s.out_dir / "last") from None
    s.run.validation_pending = False
    m = s.run.metrics
    improved = m.best_val_loss is None or loss < m.best_val_loss
    m.last_val_loss, m.last_eval_step, m.bad_evals = loss, s.run.step, 0 if improved else m.bad_evals + 1
    if improved:
        m.best_val_loss, m.best_val_bpc, m.best_step = loss, loss / math.log(2), s.run.step
    entry = {"step": s.run.step, "epoch": s.run.epoch + 1, "val_loss": loss, "val_bpc": loss / math.log(2),
             "val_ppl": math.exp(min(loss, 700.0)), "best_val_loss": m.best_val_loss, "improved": improved}
    log.info("step %d val loss %.4f nats/char, %.4f bits/char%s", s.run.step, loss, entry["val_bpc"], " (best)" if improved else "")
    emit(s, "eval", entry, s.callbacks.on_eval)
    if improved:
        save(s, "best")
    if s.cfg.early_stopping_patience is not None and m.bad_evals >= s.cfg.early_stopping_patience:
        s.run.stopped_early = True
    return entry


def out_of_steps(s: Session) -> bool:
    return s.cfg.max_steps is not None and s.run.step >= s.cfg.max_steps


def stop_requested(s: Session) -> bool:
    """Whether to stop before the next step: asked for here or, with several processes, in any of them."""
    return s.ranks.any(s.callbacks.should_stop is not None and s.callbacks.should_stop())


def run_epoch(s: Session) -> None:
    """Train the rest of the current epoch (from batch_in_epoch), validating and saving on the way."""
    cfg, run, cbs = s.cfg, s.run, s.callbacks
    run.lr = lr_at_epoch(cfg, run.epoch)
    for group in s.optimizer.param_groups:
        group["lr"] = run.lr
    order = epoch_order(cfg.seed, run.epoch, len(s.train_w))
    for b in range(run.batch_in_epoch, s.n_batches):
        if stop_requested(s):
            flush(s)
            save(s, "last")
            raise TrainingStopped(run.step, s.out_dir / "last")
        idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]  # the global batch
        mine, weight = s.ranks.batch(idx)  # this rank's slice of it (all of it in one process)
        s.ranks.reseed(cfg.seed, run.epoch, run.step)
        train_step(s, torch.from_numpy(s.train_w[mine].astype(np.int64)).to(s.device), weight, len(idx))  # (B, T + 1)
        s.cores.rebalance()
        run.batch_in_epoch = b + 1
        if cbs.on_step is not None:
            cbs.on_step(run.step, run.epoch + 1)
        if run.step % cfg.log_every_steps == 0:
            log_progress(s)
        if b + 1 == s.n_batches:
            break  # the epoch end below validates and saves
        if out_of_steps(s):
            s.stop = True
            validate(s)
            return
        if cfg.eval_every_steps and run.step % cfg.eval_every_steps == 0:
            validate(s)
            if run.stopped_early:
                s.stop = True
                return
        if cfg.checkpoint_every_steps and run.step % cfg.checkpoint_every_steps == 0:
            flush(s)
            save(s, "last")
    if run.batch_in_epoch == s.n_batches:
        end_epoch(s)


def end_epoch(s: Session) -> None:
    """Validate, record the epoch, and save last/ unless the run ends here."""
    run, m = s.run, s.run.metrics
    flush(s)
    entry = validate(s)
    epoch_entry = {"epoch": run.epoch + 1, "step": run.step, "lr": run.lr,
                   "train_loss": m.epoch_loss_sum / max(m.epoch_loss_steps, 1),
                   **{k: entry[k] for k in ("val_loss", "val_bpc", "val_ppl", "best_val_loss")}}
    run.history.append(epoch_entry)
    run.epoch, run.batch_in_epoch = run.epoch + 1, 0
    m.epoch_loss_sum, m.epoch_loss_steps = 0.0, 0
    emit(s, "epoch", epoch_entry, s.callbacks.on_epoch_end)
    s.stop = run.stopped_early or out_of_steps(s)
    if not s.stop and run.epoch < s.cfg.epochs:
        save(s, "last")


STOP_GRACE_S = 1.0  # how long a stop waits for the step in progress before last/ is saved from the step's start


def train(*, model_config: ModelConfig, train_config: TrainConfig, shards_dir, out_dir, vocab: Vocab,
          init_from=None, callbacks: TrainCallbacks | None = None, stop_grace_s: float = STOP_GRACE_S,
          ranks: Ranks | None = None) -> TrainResult:
    """Train (or resume, or return the finished run in `out_dir`); see the module docstring.

    With a `should_stop` callback the training runs in a thread of its own (see `run_stoppable`),
    so a stop is honoured within about `stop_grace_s` seconds even when one step takes minutes.
    With several `ranks` (one call per process, see model/training/distributed.py) it runs in
    this thread, and a stop is honoured at the next step boundary, agreed by every rank.
    """
    ranks = ranks or Ranks()
    out_dir = Path(out_dir)
    if (done := finished_run(out_dir, vocab, model_config)) is not None:
        return done
    callbacks = callbacks or TrainCallbacks()
    sessions: list[Session] = []

    def body(boundary: Boundary | None) -> TrainResult:
        with CoreShare(train_config.num_threads) as cores:  # in the thread that trains: torch's thread count is per thread
            s = start(model_config=model_config, cfg=train_config, shards_dir=shards_dir, out_dir=out_dir, vocab=vocab,
                      init_from=init_from, callbacks=callbacks, ranks=ranks)
            s.cores, s.boundary = cores, boundary
            sessions.append(s)
            if s.run.validation_pending and s.run.batch_in_epoch < s.n_batches:  # (at an epoch's end, end_epoch validates)
                validate(s)
            s.stop = out_of_steps(s) or s.run.stopped_early
            while not s.stop and s.run.epoch < s.cfg.epochs:
                run_epoch(s)
            flush(s)
            s.run.done = True
            save(s, "last")
        return s.run.result(s.resumed_from)

    if callbacks.should_stop is None or ranks.size > 1:
        return body(None)
    return run_stoppable(body, callbacks.should_stop, sessions, stop_grace_s)


ABANDONED_JOIN_S = 300.0  # at exit, how long an abandoned training thread may take to finish its computation


def run_stoppable(body: Callable[[Boundary], TrainResult], should_stop: Callable[[], bool], sessions: list[Session],
                  grace_s: float) -> TrainResult:
    """Run `body` in a training thread; this thread watches `should_stop` (set by a signal handler, which runs here).

    A stop is first left to the training thread, which saves last/ at its next step boundary.
    If that takes longer than `grace_s` (a step of a large model on a CPU takes tens of
    seconds), this thread takes the boundary lock while the training thread computes, saves
    last/ from the state at the start of that step, and raises TrainingStopped; the training
    thread, a daemon, gives up at its next boundary without writing anything. Either way the
    saved run resumes exactly.
    """
    boundary = Boundary()
    boundary.lock.acquire()  # held by the training thread from its first instruction
    outcome: dict = {}

    def work() -> None:
        try:
            outcome["result"] = body(boundary)
        except _Abandoned:
            pass
        except BaseException as exc:  # handed to the watching thread, which raises it
            outcome["error"] = exc

    thread = threading.Thread(target=contextvars.copy_context().run, args=(work,), name="homer-training", daemon=True)
    thread.start()
    stop_seen: float | None = None
    while thread.is_alive():
        thread.join(0.05)
        if stop_seen is None and should_stop():
            stop_seen = time.monotonic()
        if stop_seen is None or time.monotonic() - stop_seen < grace_s or not thread.is_alive():
            continue
        if not boundary.lock.acquire(timeout=0.05):  # the training thread is between computations: it will see the stop
            continue
        try:
            if not thread.is_alive() or not sessions:
                continue
            s = sessions[-1]
            boundary.abandoned = True
            if boundary.kind == "validation":
                s.run.validation_pending = True
            flush(s)
            save(s, "last", rng=boundary.rng)
        finally:
            boundary.lock.release()
        log.info("stopped inside a %s: last/ holds step %d, from before it", boundary.kind, s.run.step)
        # The abandoned thread is still inside torch. Left running when the interpreter finalizes, it crashes the
        # process (SIGSEGV, after the run's state was reported): let it reach its boundary, where it gives up, first.
        atexit.register(thread.join, ABANDONED_JOIN_S)
        raise TrainingStopped(s.run.step, s.out_dir / "last")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _parse_overrides(items: list[str]) -> dict[str, dict]:
    """`--set key=value` pairs -> {"train": {...}, "model": {...}}; a bare name is a TrainConfig field if one exists."""
    qualified = []
    for item in items:
        key, sep, raw = item.partition("=")
        if sep and "." not in key:
            key = f"{'train' if key.strip() in TrainConfig.model_fields else 'model'}.{key.strip()}"
        qualified.append(f"{key}{sep}{raw}")
    out: dict[str, dict] = {"train": {}, "model": {}}
    problems = apply_sets(out, qualified)
    problems += [f"--set {section}.*: the key must be train.<field>, model.<field> or a bare field name"
                 for section in out if section not in ("train", "model")]
    if problems:
        raise ValueError("; ".join(problems))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.training.loop", description=__doc__.split("\n")[0])
    parser.add_argument("--shards", required=True, help="directory of one corpus's train-/val- shards")
    parser.add_argument("--vocab", required=True, help="the vocab.json the shards were built with")
    parser.add_argument("--out", required=True, help="run directory (last/, best/, metrics.jsonl); resumed if present")
    parser.add_argument("--init-from", help="checkpoint directory to take the initial weights from (fine-tuning)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override train.<field> or model.<field> (a bare name is a TrainConfig field if one "
                             "exists, else a ModelConfig field); VALUE is parsed as YAML, as by `homer --set`")
    args = parser.parse_args(argv)
    try:
        overrides = _parse_overrides(args.set)
    except ValueError as exc:
        parser.error(str(exc))
    configs, errors = {}, []
    for section, cls in (("model", ModelConfig), ("train", TrainConfig)):
        try:
            configs[section] = cls(**overrides[section])
        except ValidationError as exc:
            errors.append(str(exc))
    if errors:
        parser.error("\n".join(errors))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop_requested = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stop_requested.append(signum))
    try:
        result = train(model_config=configs["model"], train_config=configs["train"], shards_dir=args.shards, out_dir=args.out,
                       vocab=Vocab.load(args.vocab), init_from=args.init_from,
                       callbacks=TrainCallbacks(should_stop=lambda: bool(stop_requested)))
    except TrainingStopped as exc:
        log.warning("%s", exc)
        return 130
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
