"""Training-stage tasks: pretrain and fine-tune through the one training loop, and report.

A training stage writes in place into `<root>/<stage>/<fingerprint>/` (checkpoints are
atomic on their own), under an inter-process lock; the output becomes complete, and
`latest`, only when its manifest is written at the end. Running the task again on an
incomplete output resumes from `last/`, so a Prefect retry or a re-run continues the
work instead of starting over. Cancellation (SIGTERM from the worker) saves `last/`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import json
import math
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable

from prefect import get_run_logger, task
from prefect.exceptions import CancelledRun
from prefect.states import Cancelled, State
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact

from model.network.checkpoint import CheckpointError, model_checkpoint, read_state, resolve_checkpoint
from model.network.rnn import ModelConfig
from model.training.progress import TerminalProgress
from model.data.shards import ShardError, list_shards
from model.store.outputs import (StageRef, StoreError, check_writable, data_root, exclusive, manifest_for, output_dir, publish_to_store,
                                 MANIFEST, ref_for, remote_of, set_latest, write_manifest)
from model.training.loop import NonFiniteLossError, TrainCallbacks, TrainConfig, TrainingStopped, train
from model.training.sweep import watch_trial
from model.data.vocab import Vocab, VocabularyError
from tasks.artifacts import location_markdown, png_markdown
from tasks.common import artifact_key, complete_ref, run_stage_task, stage_cache_key, stage_fingerprint

# Retrying these gives the same answer: bad inputs, a mismatch, a NaN, a requested stop.
NO_RETRY = (NonFiniteLossError, TrainingStopped, CheckpointError, ShardError, VocabularyError, StoreError, ValueError)


def _retry_unless_final(_task, _run, state) -> bool:
    try:
        state.result()
    except NO_RETRY:
        return False
    except Exception:
        return True
    return True


class _RequestedCancelIsNoError(logging.Filter):
    """Prefect logs every final state but Completed at ERROR, and a Cancelled top-level run's result as an
    unexpected exception: a cancel that was asked for (the UI, Ctrl-C) is no error, so those say INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            cancelled = record.exc_info and isinstance(record.exc_info[1], CancelledRun)
            if cancelled or record.getMessage().startswith(("Finished in state Cancelled", "Finished in state Pruned")):
                record.levelno, record.levelname = logging.INFO, "INFO"
                if cancelled:
                    record.msg, record.args = f"Finished: cancelled on request ({record.exc_info[1]})", None
                    record.exc_info = record.exc_text = None
        return True


for _name in ("prefect.flow_runs", "prefect.task_runs"):
    logging.getLogger(_name).addFilter(_RequestedCancelIsNoError())

STOPPED_BY: dict[str, int | None] = {"signal": None}  # the signal that stopped the last training in this process


class _StopFlag:
    """Set by SIGTERM/SIGINT (a cancelled or stopped run) so training saves last/ and stops."""

    def __init__(self):
        self.stop = False
        self.previous = {}
        STOPPED_BY["signal"] = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.stop = True
        STOPPED_BY["signal"] = signum

    def __exit__(self, *_):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def prefect_callbacks(stage: str, total_steps: int, stop: _StopFlag, history: list[dict],
                      terminal: TerminalProgress | None = None) -> tuple[TrainCallbacks, Callable]:
    """Log lines, a progress artifact and an epoch table while training runs.

    `history` holds the epochs a resumed run already did, so the table continues. Returns
    the callbacks and a function that marks the progress done.
    """
    log = get_run_logger()
    progress_id = create_progress_artifact(progress=0.0, key=artifact_key(stage, "progress"),
                                           description=f"{stage}: percent of the step budget done")
    epochs: list[dict] = [_rounded(m) for m in history]

    terminal = terminal or TerminalProgress(stage, total_steps, stream=io.StringIO())  # none given: silent

    def cosmetic(what: str, call: Callable, *args, **kwargs) -> None:
        """Artifacts are for people: a server that does not answer (a restart takes a minute) never stops a training."""
        try:
            call(*args, **kwargs)
        except Exception as exc:  # the client gave up after its retries (PREFECT_CLIENT_MAX_RETRIES)
            log.warning("could not update the %s artifact (%s); training goes on", what, type(exc).__name__)

    def on_log(m: dict) -> None:
        terminal.logged(m)
        log.info("step %d epoch %d loss %.4f chars/s %.0f lr %.2e", m["step"], m["epoch"], m["loss"], m["chars_per_s"], m["lr"])
        cosmetic("progress", update_progress_artifact, progress_id, progress=min(100.0, 100.0 * m["step"] / max(1, total_steps)))

    def on_eval(m: dict) -> None:
        log.info("validation at step %d: %.4f nats/char, %.4f bits/char%s", m["step"], m["val_loss"], m["val_bpc"],
                 " (best)" if m.get("improved") else "")

    def on_epoch_end(m: dict) -> None:
        epochs.append(_rounded(m))
        cosmetic("epochs", create_table_artifact, key=artifact_key(stage, "epochs"), table=epochs, description=f"{stage}: metrics per epoch")

    def finished() -> None:
        cosmetic("progress", update_progress_artifact, progress_id, progress=100.0)

    callbacks = TrainCallbacks(on_log=on_log, on_eval=on_eval, on_epoch_end=on_epoch_end, should_stop=lambda: stop.stop,
                               on_step=terminal.step)
    return callbacks, finished


def _rounded(metrics: dict) -> dict:
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in metrics.items()}


GPU_LIMIT = "gpu"
GPU_LEASE_S = 60


def wants_gpu_slot(device: str) -> bool:
    """Whether a training run takes the `gpu` slot: HOMER_GPU_LIMIT=auto|always|never.

    auto (the default) takes it when the run trains on CUDA and talks to a real Prefect
    server: an ephemeral server runs no lease reaper, so a killed run's slot would
    never be freed there, and a CPU run shares no GPU.
    """
    from prefect.settings import PREFECT_API_URL

    from model.training.loop import resolve_device

    mode = os.environ.get("HOMER_GPU_LIMIT", "auto").lower()
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"HOMER_GPU_LIMIT={mode!r}: expected auto, always or never")
    if mode != "auto":
        return mode == "always"
    return resolve_device(device).type == "cuda" and bool(PREFECT_API_URL.value())


@contextlib.contextmanager
def gpu_slot(device: str):
    """Hold the one slot of the `gpu` global concurrency limit (created if missing) while training."""
    if not wants_gpu_slot(device):
        yield
        return
    from prefect.concurrency.sync import concurrency

    ensure_limit(GPU_LIMIT)
    get_run_logger().info("taking the '%s' concurrency slot (waits while another training run holds it)", GPU_LIMIT)
    # A short lease: the server frees a killed run's slot within about a minute, not five.
    with concurrency(GPU_LIMIT, occupy=1, lease_duration=GPU_LEASE_S):
        yield


def ensure_limit(name: str, limit: int = 1) -> None:
    """Create the global concurrency limit `name` unless it exists (Prefect 3 needs limits created before use)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
            except ObjectAlreadyExists:
                pass  # another run created it first


def output_lease_wanted(root: Path) -> bool:
    """Whether writing an output takes a Prefect lease as well as the host lock: HOMER_OUTPUT_LOCK=auto|prefect|host.

    auto (the default) takes it when the root is in an object store (so other machines can
    write the same output) and a server other than homer's temporary one is present. A
    server without its lease reaper (a test harness, the temporary server) never frees a
    killed run's lease, so `host` is the setting there.
    """
    from prefect.settings import PREFECT_API_URL

    mode = os.environ.get("HOMER_OUTPUT_LOCK", "auto").lower()
    if mode not in ("auto", "prefect", "host"):
        raise ValueError(f"HOMER_OUTPUT_LOCK={mode!r}: expected auto, prefect or host")
    if mode != "auto":
        return mode == "prefect"
    return (remote_of(root) is not None and bool(PREFECT_API_URL.value())
            and not os.environ.get("HOMER_TEMPORARY_SERVER"))


@contextlib.contextmanager
def output_lock(root: Path, stage: str, fp: str):
    """Only one writer of `<root>/<stage>/<fp>` at a time: the host lock, and across machines a Prefect lease.

    The lease is one slot of the global concurrency limit `homer-output-<stage>-<fp>`; a
    killed holder's slot comes free when its lease ends (OUTPUT_LEASE_S) on a server that
    runs its lease reaper (`prefect server start`).
    """
    with exclusive(root, stage, fp):
        if not output_lease_wanted(root):
            yield
            return
        from prefect.concurrency.sync import concurrency

        name = f"homer-output-{stage}-{fp}"
        ensure_limit(name)
        get_run_logger().info("taking the lease '%s' (waits while another machine writes this output)", name)
        with concurrency(name, occupy=1, lease_duration=OUTPUT_LEASE_S, strict=True):
            yield


OUTPUT_LEASE_S = 60


def plan_steps(shards_dir: Path, cfg: TrainConfig) -> int:
    import pyarrow.parquet as pq

    windows = sum(pq.ParquetFile(p).metadata.num_rows for p in list_shards(shards_dir, "train"))  # footers only
    total = math.ceil(windows / cfg.batch_size) * cfg.epochs
    return min(total, cfg.max_steps) if cfg.max_steps else total


def train_stage(stage: str, *, config, model_config: ModelConfig, train_config: TrainConfig, prepare: StageRef,
                corpus: str, inputs: dict[str, StageRef], root: str, init_from: Path | None = None) -> StageRef | Cancelled:
    """Train one stage into its fingerprinted output directory (resuming if it was interrupted)."""
    root = data_root(root)
    fp = stage_fingerprint(stage, config, inputs)
    out = output_dir(root, stage, fp)
    if ref := complete_ref(root, stage, fp):
        return ref
    check_writable(root)
    log = get_run_logger()
    shards = prepare.dir / "shards" / corpus
    follower = train_config.node_rank > 0  # another machine of a training on several: it trains its share, machine 0 commits
    with contextlib.nullcontext() if follower else output_lock(root, stage, fp):
        if ref := complete_ref(root, stage, fp):  # another run finished it while we waited for the lock
            log.info("another run finished %s %s while this one waited for it; reusing it", stage, fp)
            return ref
        out.mkdir(parents=True, exist_ok=True)
        remote = remote_of(root)
        if remote is not None:  # a run killed on another machine resumes here from the store's last/
            pull_progress(remote, stage, fp, out)
        if (out / "last").exists():
            log.info("resuming %s from %s", stage, out / "last")
        vocab = Vocab.load(prepare.dir / "vocab.json")
        started = time.monotonic()
        previous = resolve_checkpoint(out / "last")
        history = read_state(previous)["history"] if previous else []
        total_steps = plan_steps(shards, train_config)
        terminal = TerminalProgress(stage, total_steps, train_config.epochs)  # a live line only when stderr is a terminal
        hosts = [socket.gethostname()]  # where it trained (by rank, once torchrun's ranks have met)
        with _StopFlag() as stop, contextlib.nullcontext() if follower else gpu_slot(train_config.device):
            callbacks, finished = prefect_callbacks(stage, total_steps, stop, history, terminal)
            pruning = watch_trial(callbacks)  # a sweep's trial (flows/sweep.py): each validation reported, pruned = stopped
            if remote is not None and not follower:
                callbacks.on_checkpoint = lambda kind, path: push_progress(remote, stage, fp, out, kind, path)
            log.info("training %s into %s: %d steps planned", stage, out, total_steps)
            run = train  # in this process
            if train_config.world_size > 1:  # torchrun's processes (DDP); rank 0 commits; a retry of this task resumes
                from model.training.distributed import launch

                run = functools.partial(launch, on_world=lambda by_rank: hosts.__setitem__(slice(None), by_rank))
            try:
                result = run(model_config=model_config, train_config=train_config, shards_dir=shards, out_dir=out,
                             vocab=vocab, init_from=init_from, callbacks=callbacks)
            except TrainingStopped as exc:  # asked for (Ctrl-C, SIGTERM, a cancel from the UI): not a failure
                if pruning is not None and pruning.pruned_at is not None:  # no manifest: incomplete, never reused as finished
                    log.info("pruned by the sweep at step %d; %s holds last/ (step %d), resumable, not complete", pruning.pruned_at, out, exc.step)
                    return Cancelled(name="Pruned", message=f"pruned by the sweep at step {pruning.pruned_at}")
                log.info("%s; last/ holds step %d", exc, exc.step)
                return Cancelled(message=f"interrupted at step {exc.step}")
            finally:
                terminal.close()  # end the progress line before anything else is printed
            if result is None:  # node_rank > 0: machine 0 holds rank 0 and commits
                return await_commit(root, stage, fp, train_config)
            finished()
        from model.report.scores import plot_losses  # matplotlib only where it is used

        plot_losses({stage: out / "metrics.jsonl"}, out / "loss.png")
        metrics = {"best_val_loss": result.best_val_loss, "best_val_bpc": result.best_val_bpc,
                   "last_val_loss": result.last_val_loss, "train_chars_per_s": round(result.train_chars_per_s, 1)}
        counts = {"steps": result.steps, "epochs": result.epochs, "stopped_early": result.stopped_early,
                  "resumed_from_step": result.resumed_from_step, "world_size": train_config.world_size,
                  "num_parameters": read_state(out / "best")["num_parameters"], "seconds": round(time.monotonic() - started, 2)}
        manifest = manifest_for(stage, fp, config, inputs, counts, metrics)
        manifest["history"] = result.history
        manifest["hosts"] = list(dict.fromkeys(hosts))  # the machines that trained it, machine 0 (rank 0) first
        write_manifest(out, manifest)
        try:
            publish_to_store(root, stage, fp, out)
        except BaseException:  # not in the store (its link went down?): this machine's mirror must not read as complete either
            (out / MANIFEST).unlink(missing_ok=True)
            raise
        set_latest(root, stage, fp)
        if remote is not None:
            forget_progress(remote, stage, fp)
    return ref_for(root, stage, fp)


COMMIT_WAIT_S = 600.0  # how long a machine with node_rank > 0 waits for machine 0's commit after training


def await_commit(root: Path, stage: str, fp: str, train_config: TrainConfig, timeout_s: float = COMMIT_WAIT_S) -> StageRef:
    """On a machine with node_rank > 0, once its ranks are done: machine 0's committed output, when it appears."""
    get_run_logger().info("trained this machine's share (node_rank %d of %d); waiting for machine 0 (%s) to commit %s/%s",
                          train_config.node_rank, train_config.nnodes, train_config.rdzv_endpoint, stage, fp)
    deadline = time.monotonic() + timeout_s
    while (ref := complete_ref(root, stage, fp)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{stage}/{fp}: the ranks ended, but machine 0 (node_rank 0, at {train_config.rdzv_endpoint}) "
                               f"committed no output in {timeout_s:.0f} s; see that machine's run of the stage")
        time.sleep(1.0)
    return ref


PROGRESS_METRICS = "progress-metrics.jsonl"  # <fp>/ in the store: metrics.jsonl of a training in progress, beside last.json


def push_progress(remote, stage: str, fp: str, out: Path, kind: str, checkpoint: Path) -> None:
    """After a checkpoint is saved: copy it (and, with last/, metrics.jsonl) to the store, so another machine can resume."""
    from model.network.checkpoint import read_state
    from model.store.remote import push_checkpoint

    push_checkpoint(remote, stage, fp, kind, checkpoint, read_state(checkpoint)["step"])
    if kind == "last" and (out / "metrics.jsonl").is_file():
        remote.fs.put_file(str(out / "metrics.jsonl"), remote.path(stage, fp, PROGRESS_METRICS))


def forget_progress(remote, stage: str, fp: str) -> None:
    """Once the output is committed: delete the checkpoints of the training in progress from the store (best effort)."""
    for name in ("last.json", "best.json", PROGRESS_METRICS, "last.d", "best.d"):
        path = remote.path(stage, fp, name)
        try:
            if remote.fs.exists(path):
                remote.fs.rm(path, recursive=name.endswith(".d"))
        except OSError as exc:  # `homer gc` removes what is left
            get_run_logger().warning("could not delete %s (%s); `homer gc --remove` will", remote.url_of(path), type(exc).__name__)


def pull_progress(remote, stage: str, fp: str, out: Path) -> None:
    """Before training: when this machine has no last/ of the output, take the store's (with best/ and metrics.jsonl)."""
    from model.store.remote import pull_checkpoint

    if resolve_checkpoint(out / "last") is not None:
        return
    if pull_checkpoint(remote, stage, fp, "last", out) is None:
        return
    pull_checkpoint(remote, stage, fp, "best", out)
    source = remote.path(stage, fp, PROGRESS_METRICS)
    if remote.fs.exists(source):
        remote.fs.get_file(source, str(out / "metrics.jsonl"))


def publish_training(stage: str, ref: StageRef, reused: bool) -> None:
    """The UI's artifacts of a training output: where best/ is, the loss curves, the final metrics.

    Published by the flow for every run, also when the output was reused (a cached run), so
    a cached run's page shows what the first run's did, marked as reused.
    """
    manifest = ref.manifest()
    note = "`last/` is beside it." + (" Reused: made by an earlier run with the same fingerprint." if reused else "")
    tag = " (reused)" if reused else ""
    create_markdown_artifact(key=artifact_key(stage, "checkpoint"),
                             markdown=location_markdown(f"{stage} best/{tag}", f"{ref.path}/best", ref.fingerprint, note=note),
                             description=f"best validation checkpoint of {stage}{tag}; last/ is beside it")
    create_markdown_artifact(key=artifact_key(stage, "loss", "curves"),
                             markdown=f"### {stage} loss curves{tag}\n\n{png_markdown(ref.dir / 'loss.png', f'{stage} loss curves')}\n",
                             description=f"{stage}: training and validation loss (nats/char) against step{tag}")
    rows = [{"metric": k, "value": v} for k, v in {**manifest["counts"], **manifest["metrics"], "reused": reused}.items()]
    create_table_artifact(key=artifact_key(stage, "summary"), table=rows, description=f"{stage}: final metrics{tag}")


def run_training(stage_task, stage: str, config, inputs: dict[str, StageRef], root: str) -> StageRef | Cancelled:
    """Run a training stage's task and publish its artifacts (also for a reused output).

    An interrupt asked for (Ctrl-C, SIGTERM, a cancel from the UI) ends the flow Cancelled,
    not Failed: last/ holds the step to resume from.
    """
    reused = complete_ref(data_root(root), stage, stage_fingerprint(stage, config, inputs)) is not None
    try:
        ref = run_stage_task(stage_task, stage, config, inputs, root)
    except CancelledRun as exc:
        return Cancelled(message=str(exc))
    if isinstance(ref, State):  # the task ended Cancelled: the flow does too
        return ref
    publish_training(stage, ref, reused)
    return ref


@task(name="pretrain", cache_key_fn=stage_cache_key("pretrain"), persist_result=True, retries=1,
      retry_delay_seconds=2, retry_condition_fn=_retry_unless_final)
def pretrain_task(config, inputs: dict[str, StageRef], root: str) -> StageRef:
    return train_stage("pretrain", config=config, model_config=config.model, train_config=config.train,
                       prepare=inputs["prepare"], corpus="wikipedia", inputs=inputs, root=root)


@task(name="finetune", cache_key_fn=stage_cache_key("finetune"), persist_result=True, retries=1,
      retry_delay_seconds=2, retry_condition_fn=_retry_unless_final)
def finetune_task(config, inputs: dict[str, StageRef], root: str) -> StageRef:
    checkpoint = model_checkpoint(inputs["init"])
    model_config = ModelConfig.model_validate(read_state(checkpoint)["model_config"])
    return train_stage("finetune", config=config, model_config=model_config, train_config=config.train,
                       prepare=inputs["prepare"], corpus="simpsons", inputs=inputs, root=root, init_from=checkpoint)


@task(name="report", cache_key_fn=stage_cache_key("report"), persist_result=True)
def report_task(config, inputs: dict[str, StageRef], root: str) -> StageRef:
    """Bits per character of both models on both corpora (test and val), samples, loss curves.

    `inputs` belong together (flows/report.py checks it): the fine-tune output, the
    model it started from and the prepare output it was fine-tuned on.
    """
    from model.network.checkpoint import load_model_from_checkpoint
    from model.generation.sampling import generate
    from model.report.scores import EVAL_SPLITS, bits_per_char, plot_losses, render_report
    from model.store.outputs import staging

    stage, root = "report", data_root(root)
    fp = stage_fingerprint(stage, config, inputs)
    if ref := complete_ref(root, stage, fp):
        return ref
    prepare = inputs["prepare"]
    with staging(root, stage, fp) as tmp:
        scores = []
        for model_name in ("pretrain", "finetune"):
            for corpus in ("wikipedia", "simpsons"):
                row = {"model": model_name, "corpus": corpus}
                for split in EVAL_SPLITS:
                    row[split] = bits_per_char(model_checkpoint(inputs[model_name]), prepare.dir / "shards" / corpus, split)
                scores.append(row)
        model, vocab, _ = load_model_from_checkpoint(model_checkpoint(inputs["finetune"]))
        samples = {t: generate(model, vocab, prompt=config.prompt, length=config.length, num_samples=config.num_samples,
                               temperature=t, seed=config.seed) for t in config.temperatures}
        runs = {name: inputs[name].dir / "metrics.jsonl" for name in ("pretrain", "finetune")}
        plot_losses({name: path for name, path in runs.items() if path.is_file()}, tmp / "loss.png")
        provenance = [f"fine-tuned model: `{inputs['finetune'].path}` (best/)",
                      f"pretrained model it started from: `{model_checkpoint(inputs['pretrain'])}`",
                      f"data it was fine-tuned on (both corpora scored here): `{prepare.path}`"]
        pretrained_on = _trained_on(inputs["pretrain"])
        if pretrained_on not in (None, prepare.fingerprint):
            provenance.append(f"warning: the pretrained model was trained on prepare {pretrained_on}, not {prepare.fingerprint}; "
                              f"its wikipedia figures may include text it trained on")
            get_run_logger().warning("%s", provenance[-1])
        markdown = render_report(scores, samples, config.prompt, "loss.png", provenance)
        (tmp / "report.md").write_text(markdown, encoding="utf-8")
        (tmp / "samples.json").write_text(json.dumps({str(t): s for t, s in samples.items()}, indent=1, ensure_ascii=False))
        metrics = {f"{s['model']}_{s['corpus']}_{split}_bpc": round(s[split]["bits_per_char"], 4)
                   for split in EVAL_SPLITS for s in scores}  # the headline (test) figures first
        counts = {f"{s['model']}_{s['corpus']}_{split}_chars": s[split]["chars"] for s in scores for split in EVAL_SPLITS}
        counts["samples"] = sum(map(len, samples.values()))
        manifest = manifest_for(stage, fp, config, inputs, counts, metrics)
        manifest["scores"] = scores
        write_manifest(tmp, manifest)
    return ref_for(root, stage, fp)


def _trained_on(model_ref: StageRef) -> str | None:
    """The prepare fingerprint a training output was trained on; None for a bare checkpoint."""
    try:
        return model_ref.manifest()["inputs"]["prepare"]["fingerprint"]
    except (StoreError, KeyError):
        return None
