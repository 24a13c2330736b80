"""`homer sweep`: a hyperparameter sweep of one training stage as a Prefect flow (Optuna ask/tell).

The `sweep` flow asks the study for a trial's parameters, trains that config with the stage's
own flow (a `sweep-trial` flow run: a subflow in a thread here, or a flow run of the
`sweep-trial` deployment on the training pool's workers), and tells the study what the trial
reached: its best validation bits per character, or that it was pruned or failed. Up to
`parallel` trials train at once. Each trial is an ordinary stage output in the artifact store
(its config differs, so its fingerprint does); a pruned trial stops like a requested stop, so
its output has no manifest: incomplete, resumable, never reused as finished (`homer gc` lists it).

    homer sweep pretrain --profile sample --trials 8 --parallel 2
    homer sweep pretrain --space space.yaml --out best.yaml
    homer sweep finetune --storage postgresql://postgres@db-host/homer_sweeps   # one study, several hosts

Where things land, for study S (sweep-<stage>-<hash of stage, space, base config, inputs>):
`<root>/sweeps/S/` holds study.journal (the default storage), best.yaml (the best trial's
config, for `homer run --config`), trials.json and the plots; the UI shows the trials table
(`homer-sweep-trials`) and the plots (`homer-sweep-plots`). Running the same sweep again adds
`trials` more trials to the same study. For an artifact root in a bucket, the journal stays on
this machine's mirror of it and the results are copied into the bucket's sweeps/S/.
"""

# No `from __future__ import annotations` here: a served flow is pickled by value with only the globals its body names,
# so its parameter types must be objects in its signature, not names to look up (TrialSpec would be missing).

import contextvars
import copy
import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Literal

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from pydantic import ValidationError

from flows.config import PipelineConfig
from flows.naming import run_namer
from model.network.checkpoint import read_state, resolve_checkpoint, resolve_model
from model.store.outputs import (StageRef, data_root, has_latest, latest, output_complete, output_dir, ref_for, remote_of, resolve,
                                 root_name, set_latest)
from model.training.sweep import (DEFAULT_SPACES, STOP_TRIALS, SpaceError, SweepConfig, TrialSpec, claim_trial, decode,
                                  encode, fail_abandoned_trials, flat_fields, open_storage, open_study, optuna_distributions,
                                  parse_space, plot_study, read_outcome, record_outcome, set_fields, space_json, study_name, trial_context)
from tasks.artifacts import code, png_markdown
from tasks.common import artifact_key, stage_fingerprint
from tasks.stages import DATA_POOL, GPU_POOL, STAGES, upstream

SweepStage = Literal["pretrain", "finetune"]
SWEEPS = "sweeps"  # <root>/sweeps/<study>/: the default storage, best.yaml, trials.json, the plots
TRIAL_DEPLOYMENT = "sweep-trial/sweep-trial"
# This module's deployments (prefect.yaml, deploy/prefect-docker.yaml, `homer serve`): the sweep itself only asks and
# tells (the CPU pool); its trials train (the GPU pool, like the training stages).
DEPLOYMENTS = {
    "sweep": {"entrypoint": "flows.sweep.homer_sweep", "pool": DATA_POOL, "tags": ["homer", "sweep"], "description": (
        "Tune a training stage (pretrain or finetune): Optuna asks for each trial's parameters, the sweep-trial deployment "
        "trains it on the GPU pool, weak trials are pruned; the trials table, the plots and the best config (YAML for "
        "`homer run --config`) come back.")},
    "sweep-trial": {"entrypoint": "flows.sweep.sweep_trial", "pool": GPU_POOL, "tags": ["homer", "sweep", "gpu"], "description": (
        "One trial of a sweep (started by the sweep deployment): the stage's flow on the trial's config, each validation "
        "reported to the study, which may prune it.")},
}


def check_space(stage: str, config: PipelineConfig, data: Any, source: str) -> dict:
    """The space `data` (from `source`, named in errors) checked against the config: each field exists in the stage's
    section, and the config takes each distribution's low, high and every choice. SpaceError lists every problem."""
    dump = config.model_dump(mode="json")

    def accepts(key: str, value: Any) -> list[str]:
        try:
            PipelineConfig.model_validate(set_fields(copy.deepcopy(dump), {key: value}))
        except ValidationError as exc:
            return [f"{key}: {value!r} is not a valid value ({e['msg']})" for e in exc.errors()]
        return []

    return parse_space(data, source, flat_fields(dump), STAGES[stage].section, accepts)


def load_space_file(stage: str, config: PipelineConfig, path: str | Path) -> dict:
    """Read and check a space file (YAML); errors name the file (and the field)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpaceError(f"--space {path}: cannot read ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise SpaceError(f"--space {path}: not valid YAML ({exc})") from exc
    check_space(stage, config, data, str(path))
    return data


def sweep_inputs(root: Path, stage: str, config: PipelineConfig) -> dict[str, StageRef]:
    """The stage task's inputs, resolved once so that every trial trains on the same data (and starting model):
    pretrain the latest prepare; finetune the model finetune.init_from names (else the latest pretrain) and the
    prepare output it was trained on."""
    if stage == "pretrain":
        if not has_latest(root, "prepare"):  # a fresh root: make the data the config describes first, as `homer run` would
            return {"prepare": prepare_data(root, config)}
        return {"prepare": latest(root, "prepare")}
    start = resolve_model(root, config.finetune.init_from, stages=("pretrain",), label="finetune.init_from")
    trained_on = start.manifest()["inputs"]["prepare"]["fingerprint"] if start.stage == "pretrain" else None
    return {"prepare": resolve(root, "prepare", trained_on), "init": start}


def prepare_data(root: Path, config: PipelineConfig) -> StageRef:
    """The ingests and prepare of `config` (each reused when its output exists), as subflows; returns prepare's output."""
    get_run_logger().info("no prepare output under %s yet: running the ingests and prepare of the given config first", root)
    refs = {name: STAGES[name].load_flow()(getattr(config, STAGES[name].section), data_dir=root_name(root), start_from="config")
            for name in upstream("prepare")}
    return STAGES["prepare"].load_flow()(config.prepare, **{param: refs[name] for param, name in STAGES["prepare"].inputs.items()},
                                         data_dir=root_name(root), start_from="config")


def trial_config(config: PipelineConfig, params: dict[str, Any]) -> PipelineConfig:
    """The base config with a trial's (decoded) parameters set."""
    return PipelineConfig.model_validate(set_fields(config.model_dump(mode="json"), params))


@flow(name="sweep-trial", flow_run_name=run_namer("sweep-trial", {"study": "trial.study", "trial": "trial.number"}))
def sweep_trial(trial: TrialSpec, config: PipelineConfig = PipelineConfig(), inputs: dict[str, StageRef] | None = None,
                data_dir: str | None = None) -> dict:
    """Train one trial of a sweep: the stage's flow on this config, each validation reported to the study, which may prune it.

    Args:
        trial: the trial in its study (storage, study, number); the storage must be reachable from this worker
        config: the trial's whole config (the sweep's base config with the trial's parameters)
        inputs: the stage task's inputs (prepare; for finetune also init); empty = as the sweep resolves them
        data_dir: artifact root (default: $HOMER_DATA_DIR or ./data)
    """
    started = time.monotonic()
    root = data_root(data_dir)
    stage = STAGES[trial.stage]
    section = getattr(config, stage.section)
    inputs = inputs or sweep_inputs(root, trial.stage, config)
    params = {"prepare": inputs["prepare"], **({"pretrain": inputs["init"]} if "init" in inputs else {})}
    fp = stage_fingerprint(trial.stage, section, inputs)
    reused = output_complete(root, trial.stage, fp)
    with trial_context(trial):  # tasks/train.py's train_stage attaches the pruning hook (model/training/sweep.py)
        state = stage.load_flow()(section, **params, data_dir=root_name(root), start_from="config", return_state=True)
    outcome: dict[str, Any] = {"fingerprint": fp, "output": ref_for(root, trial.stage, fp).path, "reused": reused}
    if state.is_completed():
        manifest = state.result().manifest()
        outcome.update(state="complete", value=manifest["metrics"]["best_val_bpc"], steps=manifest["counts"]["steps"])
    else:
        last = resolve_checkpoint(output_dir(root, trial.stage, fp) / "last")
        pruned_at = open_storage(trial.storage).get_trial(trial.trial_id).user_attrs.get("pruned_at")  # set by the hook
        outcome.update(state="failed" if pruned_at is None else "pruned", steps=read_state(last)["step"] if last else 0,
                       message=state.message if pruned_at is None else f"pruned at step {pruned_at}; the output is incomplete")
    outcome["seconds"] = round(time.monotonic() - started, 2)
    record_outcome(trial, outcome)
    get_run_logger().info("trial %d of %s: %s", trial.number, trial.study, outcome)
    return outcome


def flow_run_ended(flow_run_id: str) -> bool | None:
    """Whether a flow run (a sweep's, maybe on another host) is in a final state; None if the server cannot say."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
    except Exception:
        return None
    return None if state is None else state.is_final()


def trials_here_or_deployed(mode: str) -> str:
    """'here' or 'deployment': where the trials train (SweepConfig.trials_on)."""
    if mode == "here":
        return "here"
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(TRIAL_DEPLOYMENT)
        return "deployment"
    except ObjectNotFound:
        if mode == "deployment":
            raise ValueError(f"sweep.trials_on=deployment, but the Prefect server has no {TRIAL_DEPLOYMENT} deployment: "
                             f"`prefect deploy --all` or `homer serve` adds it (or use trials_on=here)") from None
        return "here"


def _run_trial(where: str, spec: TrialSpec, config: PipelineConfig, inputs: dict[str, StageRef], root: str) -> None:
    """Train one trial and wait for it: a subflow in this thread, or a flow run of the sweep-trial deployment."""
    if where == "here":
        sweep_trial(trial=spec, config=config, inputs=inputs, data_dir=root, return_state=True)
        return
    from prefect.deployments import run_deployment

    run = run_deployment(TRIAL_DEPLOYMENT, timeout=None, poll_interval=2, parameters={
        "trial": spec.model_dump(), "config": config.model_dump(mode="json"),
        "inputs": {k: v.model_dump() for k, v in inputs.items()}, "data_dir": root})
    if not run.state.is_completed():
        raise RuntimeError(f"flow run {run.name} of {TRIAL_DEPLOYMENT} ended {run.state.name}: {run.state.message}")


def _tell(study, trial, spec: TrialSpec, error: BaseException | None) -> dict:
    """Tell the study how a trial ended (its outcome, recorded by its run; a run that recorded none failed)."""
    from optuna.trial import TrialState

    outcome = read_outcome(spec.storage, spec.trial_id)
    if outcome is None:
        outcome = {"state": "failed", "message": f"{type(error).__name__}: {error}" if error else "the trial's run recorded no outcome"}
        record_outcome(spec, outcome)
    if outcome["state"] == "complete":
        study.tell(trial, outcome["value"])
    else:
        study.tell(trial, state=TrialState.PRUNED if outcome["state"] == "pruned" else TrialState.FAIL)
    return outcome


def run_trials(study, sweep: SweepConfig, stage: str, space: dict, config: PipelineConfig, inputs: dict[str, StageRef],
               root: str, storage: str, where: str) -> list[int]:
    """Ask, train and tell `sweep.trials` trials, up to `sweep.parallel` at once; returns their numbers.

    Interrupted (Ctrl-C, a cancel), the trials training here stop as a stage run does (last/ saved) and are told failed.
    """
    log = get_run_logger()
    distributions = optuna_distributions(space)
    pending: dict = {}
    numbers: list[int] = []
    STOP_TRIALS.clear()
    try:
        with ThreadPoolExecutor(max_workers=sweep.parallel, thread_name_prefix="homer-trial") as pool:
            try:
                while len(numbers) < sweep.trials or pending:
                    while len(numbers) < sweep.trials and len(pending) < sweep.parallel:
                        trial = study.ask(distributions)
                        claim_trial(trial, str(flow_run.id) if flow_run.id else None)
                        params = decode(space, trial.params)
                        spec = TrialSpec(stage=stage, storage=storage, study=study.study_name, number=trial.number,
                                         trial_id=trial._trial_id, pruner=sweep.pruner,
                                         pruner_startup_trials=sweep.pruner_startup_trials,
                                         pruner_warmup_steps=sweep.pruner_warmup_steps)
                        log.info("trial %d: %s", trial.number, ", ".join(f"{k}={v}" for k, v in params.items()))
                        # each thread gets a copy of this flow run's context: its trial is a subflow of the sweep
                        future = pool.submit(contextvars.copy_context().run, _run_trial, where, spec,
                                             trial_config(config, params), inputs, root)
                        pending[future] = (trial, spec)
                        numbers.append(trial.number)
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        trial, spec = pending.pop(future)
                        outcome = _tell(study, trial, spec, future.exception())
                        log.info("trial %d %s%s", trial.number, outcome["state"],
                                 f": best validation {outcome['value']:.4f} bits/char" if "value" in outcome else
                                 f" ({outcome.get('message')})" if outcome["state"] == "failed" else "")
            except BaseException:
                STOP_TRIALS.set()  # the trials training here stop as on Ctrl-C (last/ saved); the pool waits for them
                raise
    finally:
        STOP_TRIALS.clear()
        for future, (trial, spec) in pending.items():  # interrupted: what they recorded, else failed
            _tell(study, trial, spec, future.exception() if future.done() else None)
    return numbers


def trial_rows(study, section: str) -> list[dict]:
    """One row per trial of the study (this run's, earlier runs', other processes'): the trials table."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        outcome = t.user_attrs.get("outcome") or {}
        best = t.value if t.value is not None else (min(t.intermediate_values.values()) if t.intermediate_values else None)
        rows.append({"trial": t.number, **{k.removeprefix(f"{section}."): v for k, v in t.params.items()},
                     "state": outcome.get("state", t.state.name.lower()), "best_val_bpc": None if best is None else round(best, 4),
                     "steps": outcome.get("steps"), "seconds": outcome.get("seconds"), "output": outcome.get("fingerprint")})
    return rows


def redacted(storage: str) -> str:
    """A storage URL without its password (for logs, artifacts and files)."""
    if "://" not in storage:
        return storage
    from sqlalchemy.engine import make_url

    try:
        return make_url(storage).render_as_string(hide_password=True)
    except Exception:
        return storage.split("://", 1)[0] + "://***"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def best_config_yaml(study, best, space: dict, config: PipelineConfig) -> str:
    """The best trial's whole config as YAML for `homer run --config` / `homer stage <stage> --config`."""
    params = decode(space, best.params)
    head = [f"# homer sweep: the best trial of study {study.study_name}: trial {best.number}, best validation "
            f"{best.value:.4f} bits/char",
            *(f"#   {k}: {json.dumps(v)}" for k, v in params.items()),
            "# the whole config it trained with: `homer run --config best.yaml` or `homer stage <stage> --config best.yaml`"]
    return "\n".join(head) + "\n" + yaml.safe_dump(trial_config(config, params).model_dump(mode="json"), sort_keys=False)


def publish(study, stage: str, space: dict, config: PipelineConfig, root: Path, folder: Path, storage: str,
            numbers: list[int]) -> dict:
    """The trials table and plots in the UI; best.yaml, trials.json and the plots in the sweep's folder; latest = the best."""
    from optuna.trial import TrialState

    section = STAGES[stage].section
    rows = trial_rows(study, section)
    create_table_artifact(key=artifact_key("sweep", "trials"), table=rows,
                          description=f"sweep {study.study_name}: every trial of the study, best validation bits/char")
    _write_atomic(folder / "trials.json", json.dumps(rows, indent=1, default=str))
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    best = min(complete, key=lambda t: t.value) if complete else None
    summary: dict[str, Any] = {"study": study.study_name, "storage": redacted(storage), "folder": str(folder), "trials": len(rows),
                               "this_run": numbers, "best": None, "best_config": None}
    lines = [f"# sweep {study.study_name}", "", f"- stage: {stage}; trials in the study: {len(rows)} (this run: "
             f"{', '.join(map(str, numbers)) or 'none'})", f"- storage: {code(redacted(storage))}", f"- folder: {code(str(folder))}"]
    if best is not None:
        outcome = best.user_attrs.get("outcome") or {}
        text = best_config_yaml(study, best, space, config)
        _write_atomic(folder / "best.yaml", text)
        summary["best"] = {"number": best.number, "value": best.value, "params": decode(space, best.params),
                           "fingerprint": outcome.get("fingerprint"), "output": outcome.get("output")}
        summary["best_config"] = str(folder / "best.yaml")
        if outcome.get("fingerprint") and output_complete(root, stage, outcome["fingerprint"]):
            set_latest(root, stage, outcome["fingerprint"])  # the next stage starts from the best trial
        lines.append(f"- best: trial {best.number}, {best.value:.4f} bits/char, {code(outcome.get('output', ''))}; its "
                     f"config: {code(str(folder / 'best.yaml'))}")
    for png in plot_study(study, folder):
        lines += ["", png_markdown(png, png.stem.replace("-", " "))]
    create_markdown_artifact(key=artifact_key("sweep", "plots"), markdown="\n".join(lines) + "\n",
                             description=f"sweep {study.study_name}: the optimisation history and the validation curves")
    push_results(root, folder)
    return summary


def push_results(root: Path, folder: Path) -> None:
    """For an artifact root in a bucket: copy the sweep's results (not the journal, which stays on this machine's mirror)."""
    remote = remote_of(root)
    if remote is None:
        return
    for file in sorted(folder.iterdir()):
        if file.is_file() and not file.name.startswith(".") and file.suffix in (".yaml", ".json", ".png"):
            remote.fs.put_file(str(file), remote.path(SWEEPS, folder.name, file.name))


@flow(name="sweep", flow_run_name=run_namer("sweep", {"stage": "stage", "trials": "sweep.trials", "parallel": "sweep.parallel"}))
def homer_sweep(stage: SweepStage = "pretrain", config: PipelineConfig = PipelineConfig(), sweep: SweepConfig = SweepConfig(),
                space: dict[str, Any] | None = None, data_dir: str | None = None) -> dict:
    """Search a training stage's hyperparameters: Optuna ask/tell, each trial a training run of the stage, weak ones pruned.

    Args:
        stage: the stage to tune: pretrain or finetune
        config: the base config; each trial changes only the fields of the space
        sweep: trials, parallelism, the study's storage, sampler and pruner
        space: {dotted config field: {low, high, log, step} or {choices: [...]}}; empty = the stage's default space
        data_dir: artifact root (default: $HOMER_DATA_DIR or ./data)
    """
    log = get_run_logger()
    root = data_root(data_dir)
    section = STAGES[stage].section
    space = check_space(stage, config, space or DEFAULT_SPACES[stage], "given" if space else f"(the {stage} default)")
    inputs = sweep_inputs(root, stage, config)
    name = sweep.study or study_name(stage, stage_fingerprint(stage, getattr(config, section), inputs), space)
    folder = root / SWEEPS / name
    folder.mkdir(parents=True, exist_ok=True)
    storage = sweep.storage or os.environ.get("HOMER_SWEEP_STORAGE") or str(folder / "study.journal")
    study = open_study(sweep, name, storage)
    if "space" not in study.user_attrs:
        study.set_user_attr("stage", stage)
        study.set_user_attr("space", space_json(space))
    for params in sweep.enqueue:
        unknown = sorted(set(params) - set(space))
        if unknown:
            raise SpaceError(f"sweep.enqueue: {', '.join(unknown)} not in the space ({', '.join(space)})")
        study.enqueue_trial({k: encode(v) for k, v in params.items()}, skip_if_exists=True)
    if abandoned := fail_abandoned_trials(study, flow_run_ended):
        log.warning("trial(s) %s were left running by a sweep process that is gone: told failed",
                    ", ".join(map(str, abandoned)))
    where = trials_here_or_deployed(sweep.trials_on)
    log.info("study %s in %s: %d trial(s) so far; %d more, %d at a time, trained %s", name, redacted(storage), len(study.trials),
             sweep.trials, sweep.parallel, "here" if where == "here" else f"by the {TRIAL_DEPLOYMENT} deployment's workers")
    if where == "deployment" and "://" not in storage:
        log.warning("the study is a file on this machine (%s): workers on other machines cannot report to it; give "
                    "--storage postgresql://... to spread trials over hosts", storage)
    numbers = run_trials(study, sweep, stage, space, config, inputs, root_name(root), storage, where)
    return publish(study, stage, space, config, root, folder, storage, numbers)
