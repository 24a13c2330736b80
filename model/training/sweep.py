"""Hyperparameter sweeps, without Prefect: the search space, the Optuna study and the pruning hook.

A sweep trains one stage (pretrain or finetune) many times with configs drawn from a search
space and keeps the one with the lowest best validation bits per character. flows/sweep.py runs
it as a Prefect flow (`homer sweep`); this module holds what needs no Prefect:

- the space: a mapping of dotted config fields to distributions (`parse_space`, `DEFAULT_SPACES`);
- the study: named by stage, space and base config (`study_name`), kept in an Optuna storage
  (`open_storage`: a journal file on one machine, or an SQLAlchemy URL such as postgresql://
  shared by sweep processes on several hosts), with its sampler and pruner (`SweepConfig`);
- the pruning hook (`watch_trial`): inside a trial's training, each validation's bits per
  character is reported to the study, and when the pruner says so the training stops the way a
  requested stop does (last/ saved, no manifest), so its output stays incomplete: never read as
  a finished model, and resumable by a later run of the same config.

    space = parse_space({"pretrain.train.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}}, "space.yaml",
                        fields={"pretrain.train.learning_rate": 0.003}, section="pretrain")
    study = open_study(SweepConfig(), study_name("pretrain", base_fp, space), storage="/tmp/study.journal")
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import hashlib
import json
import math
import threading
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError

SCALAR = (type(None), bool, int, float, str)  # what Optuna keeps as a categorical choice; other choices travel as JSON


class SpaceError(ValueError):
    """A search space with one or more problems; the message names the file and each field."""


class SweepConfig(BaseModel):
    """How a sweep runs: how many trials, how many at once, where the study lives, how it samples and prunes."""

    model_config = ConfigDict(extra="forbid")

    trials: PositiveInt = Field(10, description="trials this run adds to the study (N more: running the same sweep again "
                                "continues the study with N more trials)")
    parallel: PositiveInt = Field(1, description="trials trained at once (threads here, or flow runs of the sweep-trial "
                                  "deployment on the pool's workers)")
    storage: str | None = Field(None, description="the Optuna storage: empty = $HOMER_SWEEP_STORAGE, else a journal file in "
                                "<root>/sweeps/<study>/ (one machine); an SQLAlchemy URL (postgresql://user@host/db) shares "
                                "the study among sweep processes on several hosts")
    study: str | None = Field(None, description="the study's name; empty = sweep-<stage>-<hash of the stage, the space, "
                              "the base config and the inputs>, so the same sweep continues the same study")
    sampler: Literal["tpe", "random"] = Field("tpe", description="how parameters are drawn: tpe (Bayesian, random for its "
                                              "first 10 trials) or random")
    seed: int | None = Field(None, description="the sampler's seed; empty = random (sweep processes sharing a study must "
                                           "not share a seed, or they draw the same parameters)")
    pruner: Literal["median", "none"] = Field("median", description="stop a trial whose validation bits per character is "
                                              "worse than the median of earlier trials at the same step; none = never")
    pruner_startup_trials: NonNegativeInt = Field(2, description="no pruning until this many trials have finished")
    pruner_warmup_steps: NonNegativeInt = Field(0, description="no pruning of a trial before this training step")
    trials_on: Literal["auto", "here", "deployment"] = Field(
        "auto", description="where trials train: here = subflows in threads of this flow run; deployment = flow runs of "
        "the sweep-trial deployment, on the workers of its pool; auto = the deployment when the Prefect server has it")
    enqueue: list[dict[str, Any]] = Field(default_factory=list, description="parameter sets ({dotted field: value}) to "
                                          "try first, e.g. the current recipe; one the study already has is skipped")


class Distribution(BaseModel):
    """One field's distribution in a search space: low/high (float or int), or choices (categorical)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["float", "int", "categorical"] | None = Field(None, description="empty = categorical with choices, else "
                                                                "the type of the field's value")
    low: float | None = Field(None, description="the smallest value (float and int)")
    high: float | None = Field(None, description="the largest value (float and int)")
    log: bool = Field(False, description="sample on a log scale (low must be above 0)")
    step: float | None = Field(None, description="sample multiples of this from low (float and int; not with log)")
    choices: list[Any] | None = Field(None, description="the values to choose from (categorical); any YAML value, lists too")


# The default space of each stage: the learning rate first, then what most changes a small model's loss.
DEFAULT_SPACES: dict[str, dict[str, dict]] = {
    "pretrain": {
        "pretrain.train.learning_rate": {"low": 3e-4, "high": 1e-2, "log": True},
        "pretrain.model.dropout": {"low": 0.0, "high": 0.5},
        "pretrain.model.embedding_dim": {"choices": [64, 128, 256]},
    },
    "finetune": {
        "finetune.train.learning_rate": {"low": 1e-6, "high": 1e-3, "log": True},
        "finetune.train.constant_epochs": {"low": 1, "high": 8},
    },
}


def flat_fields(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: every leaf of a config dump by its dotted name."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat_fields(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def parse_space(data: Any, source: str, fields: dict[str, Any], section: str,
                accepts: Callable[[str, Any], list[str]] | None = None) -> dict[str, Distribution]:
    """A space mapping checked field by field: each key a field of `section` (in `fields`, its current values), each
    value a distribution of the right type, and (with `accepts(field, value) -> problems`: the config's own checks)
    its low, high and every choice a value the config takes. Every problem at once, as a SpaceError naming `source`
    and the field."""
    if not isinstance(data, dict) or not data:
        raise SpaceError(f"{source}: expected a mapping of dotted config fields to distributions, e.g. "
                         f"'{section}.train.learning_rate: {{low: 1e-4, high: 1e-2, log: true}}'; got {type(data).__name__}"
                         f"{' (empty)' if isinstance(data, dict) else ''}")
    space, problems = {}, []
    for key, spec in data.items():
        key = str(key)
        if not key.startswith(f"{section}."):
            problems.append(f"{key}: a {section} sweep varies {section}.* fields only")
            continue
        if key not in fields:
            leaves = {name.rsplit(".", 1)[-1]: name for name in fields if name.startswith(f"{section}.")}
            near = [leaves[leaf] for leaf in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(leaves), n=1, cutoff=0.8)]
            problems.append(f"{key}: no such config field" + (f" (did you mean {', '.join(near)}?)" if near else ""))
            continue
        if not isinstance(spec, dict):
            problems.append(f"{key}: expected {{low: .., high: ..}} or {{choices: [..]}}, got {spec!r}")
            continue
        try:
            dist = Distribution.model_validate(spec)
        except ValidationError as exc:
            problems.extend(f"{key}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            continue
        own = [f"{key}: {p}" for p in _check(dist, fields[key])]
        problems.extend(own)
        if dist.type is None:
            dist.type = "categorical" if dist.choices is not None else (
                "int" if isinstance(fields[key], int) and not isinstance(fields[key], bool) else "float")
        if accepts is not None and not own:
            problems.extend(p for value in space_values(dist) for p in accepts(key, value))
        space[key] = dist
    if problems:
        raise SpaceError(f"{len(problems)} problem(s) in the search space {source}:\n" + "\n".join(f"  - {p}" for p in problems))
    return space


def _check(dist: Distribution, current: Any) -> list[str]:
    """The problems of one distribution on its own (the config checks the values: flows/sweep.py)."""
    if dist.choices is not None:
        if dist.low is not None or dist.high is not None or dist.type not in (None, "categorical"):
            return ["give either choices or low/high, not both"]
        if not dist.choices:
            return ["choices is empty"]
        return []
    if dist.type == "categorical":
        return ["a categorical distribution needs choices"]
    if dist.low is None or dist.high is None:
        return ["needs low and high (or choices)"]
    problems = []
    if dist.low > dist.high:
        problems.append(f"low {dist.low:g} is above high {dist.high:g}")
    if dist.log and dist.low <= 0:
        problems.append(f"log needs low above 0 (got {dist.low:g})")
    if dist.log and dist.step is not None:
        problems.append("log and step do not go together")
    if dist.step is not None and dist.step <= 0:
        problems.append(f"step must be above 0 (got {dist.step:g})")
    is_int = dist.type == "int" or (dist.type is None and isinstance(current, int) and not isinstance(current, bool))
    if is_int and any(v is not None and v != int(v) for v in (dist.low, dist.high, dist.step)):
        problems.append("an int field needs whole low, high and step")
    if isinstance(current, (list, dict, str, bool)) or (current is None and dist.type is None):
        problems.append(f"the field holds {current!r}: give choices instead")
    return problems


def space_values(dist: Distribution) -> list[Any]:
    """The extreme values of a distribution (low and high, or every choice): what the config must accept."""
    if dist.type == "categorical":
        return list(dist.choices)
    cast = int if dist.type == "int" else float
    return [cast(dist.low), cast(dist.high)]


def encode(value: Any) -> Any:
    """A categorical choice as Optuna keeps it: scalars as they are, lists and mappings as JSON text."""
    return value if isinstance(value, SCALAR) else json.dumps(value)


def optuna_distributions(space: dict[str, Distribution]) -> dict:
    """The space as Optuna distributions, for `study.ask(fixed_distributions=...)`."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, d in space.items():
        if d.type == "categorical":
            out[key] = CategoricalDistribution([encode(c) for c in d.choices])
        elif d.type == "int":
            out[key] = IntDistribution(int(d.low), int(d.high), log=d.log, step=int(d.step or 1))
        else:
            out[key] = FloatDistribution(d.low, d.high, log=d.log, step=d.step)
    return out


def decode(space: dict[str, Distribution], params: dict[str, Any]) -> dict[str, Any]:
    """A trial's params as config values (a JSON-text choice back to its list or mapping)."""
    out = {}
    for key, value in params.items():
        d = space.get(key)
        if d is not None and d.type == "categorical":
            value = next((c for c in d.choices if encode(c) == value), value)
        out[key] = value
    return out


def set_fields(tree: dict, values: dict[str, Any]) -> dict:
    """Set dotted fields in a config dump (in place; returns it)."""
    for key, value in values.items():
        *parents, last = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def space_json(space: dict[str, Distribution]) -> dict:
    return {key: d.model_dump(exclude_none=True) for key, d in sorted(space.items())}


def study_name(stage: str, base_fingerprint: str, space: dict[str, Distribution]) -> str:
    """sweep-<stage>-<12 hex>: the same stage, space and base config (with its inputs) name the same study."""
    blob = json.dumps({"stage": stage, "base": base_fingerprint, "space": space_json(space)}, sort_keys=True)
    return f"sweep-{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


# ---------------------------------------------------------------------------- storage and study

_STORAGES: dict[str, Any] = {}
_STORAGES_LOCK = threading.Lock()


def is_database_url(storage: str) -> bool:
    """An SQLAlchemy URL (postgresql://, sqlite:///, mysql://...): Optuna's RDB storage; anything else is a journal file."""
    head, sep, _ = storage.partition("://")
    return bool(sep) and head.replace("+", "").isalnum()


# pg_advisory_lock's key for making Optuna's tables: any constant the other users of the database do not take.
_SCHEMA_LOCK_KEY = int.from_bytes(hashlib.sha256(b"recurrent-homer optuna schema").digest()[:7], "big")


@contextlib.contextmanager
def _schema_lock(storage: str):
    """On PostgreSQL, one process at a time makes Optuna's tables in a fresh database: RDBStorage creates them unlocked,
    so two sweeps started at once on an empty database both try, and one fails on a duplicate `alembic_version` type.
    The lock is a session-level advisory lock, released when the connection closes (also when this process dies)."""
    if not storage.split("://", 1)[0].startswith("postgresql"):
        yield  # SQLite serialises writers itself; MySQL is not guarded here
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(storage, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": _SCHEMA_LOCK_KEY})
    finally:
        engine.dispose()


def open_storage(storage: str):
    """One Optuna storage per URL or path in this process (threads share it): RDBStorage for a database URL, else a
    journal file (JournalStorage with a file lock: several processes on one machine may share it)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    with _STORAGES_LOCK:
        if storage not in _STORAGES:
            if is_database_url(storage):
                with _schema_lock(storage):
                    _STORAGES[storage] = optuna.storages.RDBStorage(storage, engine_kwargs={"pool_pre_ping": True})
            else:
                _STORAGES[storage] = optuna.storages.JournalStorage(JournalFileBackend(storage))
        return _STORAGES[storage]


def make_pruner(kind: str, startup_trials: int, warmup_steps: int):
    import optuna

    if kind == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_steps)


def open_study(cfg: SweepConfig, name: str, storage: str):
    """Create the study, or load it when it exists (a sweep run again continues it); minimises bits per character."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = (optuna.samplers.TPESampler(seed=cfg.seed, constant_liar=True) if cfg.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=cfg.seed))
    return optuna.create_study(study_name=name, storage=open_storage(storage), sampler=sampler, direction="minimize",
                               pruner=make_pruner(cfg.pruner, cfg.pruner_startup_trials, cfg.pruner_warmup_steps),
                               load_if_exists=True)


# ---------------------------------------------------------------------------- who asked a trial

OWNER_ATTR = "asked_by"  # a trial's user attribute: {"host", "process" (pid:start), "flow_run"} of the sweep that asked it


def claim_trial(trial, flow_run_id: str | None) -> None:
    """Record on the trial which sweep process asked it, so a later sweep can tell if that process is gone."""
    import socket

    from model.training.processes import process_record

    trial.set_user_attr(OWNER_ATTR, {"host": socket.gethostname(), "process": process_record(), "flow_run": flow_run_id})


def fail_abandoned_trials(study, flow_run_ended: Callable[[str], bool | None]) -> list[int]:
    """Tell FAIL for every trial left RUNNING by a sweep process that is gone; returns their numbers.

    A sweep killed outright (SIGKILL, a host that died) never tells its trials, and they would
    show as running for ever. A trial asked on this host is abandoned when the process that asked
    it no longer runs; one asked on another host, when `flow_run_ended(its sweep's flow run id)`
    says True (False: still running; None: unknown, so it is left alone).
    """
    import socket

    from optuna.trial import TrialState

    from model.training.processes import same_process

    here = socket.gethostname()
    ended: dict[str, bool | None] = {}  # one question per sweep run, however many of its trials are left
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(OWNER_ATTR)
        if not isinstance(owner, dict):
            continue
        if owner.get("host") == here:
            gone = not same_process(str(owner.get("process", "")))
        elif run_id := owner.get("flow_run"):
            if run_id not in ended:
                ended[run_id] = flow_run_ended(run_id)
            gone = ended[run_id] is True
        else:
            gone = False
        if gone:
            try:
                study.tell(trial.number, state=TrialState.FAIL)
            except ValueError:  # told meanwhile by its owner after all
                continue
            failed.append(trial.number)
    return failed


# ---------------------------------------------------------------------------- a trial's training

class TrialSpec(BaseModel):
    """What a trial's training needs to report to its study: serialisable, so a trial can run on another worker."""

    model_config = ConfigDict(extra="forbid")

    stage: Literal["pretrain", "finetune"] = Field(description="the stage the trial trains")
    storage: str = Field(description="the study's Optuna storage (a journal file or a database URL), reachable from the worker")
    study: str = Field(description="the study's name")
    number: NonNegativeInt = Field(description="the trial's number in the study")
    trial_id: NonNegativeInt = Field(description="the trial's id in the storage")
    pruner: Literal["median", "none"] = Field("median", description="SweepConfig.pruner")
    pruner_startup_trials: NonNegativeInt = Field(2, description="SweepConfig.pruner_startup_trials")
    pruner_warmup_steps: NonNegativeInt = Field(0, description="SweepConfig.pruner_warmup_steps")


CURRENT_TRIAL: contextvars.ContextVar[TrialSpec | None] = contextvars.ContextVar("homer_sweep_trial", default=None)
STOP_TRIALS = threading.Event()  # set by a sweep that is stopping: its trials in this process stop as on Ctrl-C


@contextlib.contextmanager
def trial_context(spec: TrialSpec):
    """Inside: training runs are this trial (watch_trial finds it). A function, not the ContextVar itself, for the flows
    to use: a served flow's function is pickled with what it names, and a ContextVar does not pickle."""
    token = CURRENT_TRIAL.set(spec)
    try:
        yield
    finally:
        CURRENT_TRIAL.reset(token)


class Pruning:
    """The pruning hook of one trial: `validated(step, val_bpc) -> stop` reports to the study and asks its pruner."""

    def __init__(self, trial):
        self.trial = trial
        self.pruned_at: int | None = None  # the step the pruner stopped the training at

    def validated(self, step: int, val_bpc: float) -> bool:
        if not math.isfinite(val_bpc):
            return False  # a NaN stops the training anyway (NonFiniteLossError)
        self.trial.report(val_bpc, step)
        if self.pruned_at is None and self.trial.should_prune():
            self.pruned_at = step
            self.trial.set_user_attr("pruned_at", step)  # for the sweep: its training ends like a requested stop
        return self.pruned_at is not None

    def attach(self, callbacks) -> None:
        """Hook into a TrainCallbacks: report after each validation (on_eval); a prune stops as a requested stop does
        (should_stop), so the loop saves last/ at the next step boundary and raises TrainingStopped."""
        on_eval, should_stop = callbacks.on_eval, callbacks.should_stop

        def eval_and_report(m: dict) -> None:
            if on_eval is not None:
                on_eval(m)
            self.validated(m["step"], m["val_bpc"])

        def stop() -> bool:
            return self.pruned_at is not None or STOP_TRIALS.is_set() or bool(should_stop and should_stop())

        callbacks.on_eval, callbacks.should_stop = eval_and_report, stop


def watch_trial(callbacks) -> Pruning | None:
    """In a sweep's trial (CURRENT_TRIAL is set): attach its pruning hook to `callbacks` and return it; else None."""
    spec = CURRENT_TRIAL.get()
    if spec is None:
        return None
    import optuna

    study = optuna.load_study(study_name=spec.study, storage=open_storage(spec.storage),
                              pruner=make_pruner(spec.pruner, spec.pruner_startup_trials, spec.pruner_warmup_steps))
    pruning = Pruning(optuna.trial.Trial(study, spec.trial_id))
    pruning.attach(callbacks)
    return pruning


def record_outcome(spec: TrialSpec, outcome: dict) -> None:
    """Keep what a trial's run found (state, value, steps, seconds, output) in the study, for the sweep that waits on it."""
    open_storage(spec.storage).set_trial_user_attr(spec.trial_id, "outcome", outcome)


def read_outcome(storage: str, trial_id: int) -> dict | None:
    return open_storage(storage).get_trial(trial_id).user_attrs.get("outcome")



# ---------------------------------------------------------------------------- plots

PLOTS = {"optimization-history": "plot_optimization_history", "validation-curves": "plot_intermediate_values"}


def plot_study(study, folder) -> list:
    """The study's optimisation history and each trial's validation curve (pruned ones end early) as PNGs in `folder`."""
    import warnings
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")  # no display on servers and workers
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as plots

    written = []
    for name, function in PLOTS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental" and "no complete trial" warnings
            try:
                ax = getattr(plots, function)(study)
            except Exception:  # nothing to draw yet (no trial with a value or a curve)
                continue
        fig = ax.figure
        fig.set_size_inches(8, 4.5)
        fig.tight_layout()
        out = Path(folder) / f"{name}.png"
        tmp = out.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(out)
        written.append(out)
    return written
