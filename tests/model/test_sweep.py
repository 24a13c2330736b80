"""model/training/sweep.py: the space's format checks, categorical choices that are lists, and the pruning hook in
the real training loop (a pruned run stops after the validation that pruned it, last/ saved and not done, and resumes)."""

from __future__ import annotations

import pytest

from model.network.checkpoint import read_state
from model.training.loop import TrainCallbacks, TrainConfig, TrainingStopped, train
from model.training.sweep import (Pruning, SpaceError, SweepConfig, decode, open_study, optuna_distributions, parse_space,
                                  study_name)

FIELDS = {"pretrain.train.learning_rate": 0.003, "pretrain.train.epochs": 25, "pretrain.model.hidden_sizes": [256],
          "pretrain.model.dropout": 0.1, "prepare.seq_len": 100}


def test_a_space_names_the_file_and_every_bad_field():
    bad = {"pretrain.train.learning_rate": {"low": 0, "high": 1e-2, "log": True},
           "pretrain.train.epochs": {"low": 5, "high": 2},
           "prepare.seq_len": {"choices": [50, 100]},
           "pretrain.train.learning_rte": {"low": 1e-4, "high": 1e-2},
           "pretrain.model.hidden_sizes": {"low": 1, "high": 2},
           "pretrain.model.dropout": {"low": 0.0, "high": 0.5, "colour": "red"}}
    with pytest.raises(SpaceError) as err:
        parse_space(bad, "space.yaml", FIELDS, "pretrain")
    text = str(err.value)
    assert text.startswith("6 problem(s) in the search space space.yaml")
    for expected in ("pretrain.train.learning_rate: log needs low above 0", "pretrain.train.epochs: low 5 is above high 2",
                     "prepare.seq_len: a pretrain sweep varies pretrain.* fields only",
                     "pretrain.train.learning_rte: no such config field (did you mean pretrain.train.learning_rate?)",
                     "pretrain.model.hidden_sizes: the field holds [256]: give choices instead",
                     "pretrain.model.dropout.colour: Extra inputs are not permitted"):
        assert expected in text, text
    with pytest.raises(SpaceError, match="space.yaml: expected a mapping"):
        parse_space(["pretrain.train.epochs"], "space.yaml", FIELDS, "pretrain")


def test_types_follow_the_field_and_list_choices_come_back_as_lists(tmp_path):
    space = parse_space({"pretrain.train.learning_rate": {"low": "1e-4", "high": "1e-2", "log": True},  # YAML reads 1e-4 as text
                         "pretrain.train.epochs": {"low": 2, "high": 4},
                         "pretrain.model.hidden_sizes": {"choices": [[128], [256, 256]]}}, "s.yaml", FIELDS, "pretrain")
    assert [d.type for d in space.values()] == ["float", "int", "categorical"]
    study = open_study(SweepConfig(seed=1, sampler="random"), "s", str(tmp_path / "study.journal"))
    trial = study.ask(optuna_distributions(space))
    values = decode(space, trial.params)
    assert 1e-4 <= values["pretrain.train.learning_rate"] <= 1e-2 and values["pretrain.train.epochs"] in (2, 3, 4)
    assert values["pretrain.model.hidden_sizes"] in ([128], [256, 256])
    again = parse_space({"pretrain.train.epochs": {"low": 2, "high": 4}}, "s.yaml", FIELDS, "pretrain")
    assert study_name("pretrain", "fp", space) == study_name("pretrain", "fp", dict(space))
    assert study_name("pretrain", "fp", again) != study_name("pretrain", "fp", space) != study_name("pretrain", "other", space)


def test_the_pruning_hook_stops_the_loop_after_that_validation_and_the_run_resumes(tmp_path, corpus, tiny_model_config):
    """A trial worse than the finished one at the same step is pruned: TrainingStopped right after the validation,
    last/ holds that step and is not done (no finished run), and training the same directory again goes on."""
    from optuna.trial import TrialState

    study = open_study(SweepConfig(pruner_startup_trials=1), "prune", str(tmp_path / "study.journal"))
    done = study.ask()
    for step in (3, 6, 9):
        done.report(0.01, step)  # a finished trial far better than anything this tiny model reaches
    study.tell(done, 0.01)
    pruning = Pruning(study.ask())
    callbacks = TrainCallbacks()
    pruning.attach(callbacks)
    cfg = TrainConfig(learning_rate=1e-2, batch_size=8, epochs=2, eval_every_steps=3, checkpoint_every_steps=0, log_every_steps=100)
    args = dict(model_config=tiny_model_config, train_config=cfg, shards_dir=corpus.shards, vocab=corpus.vocab,
                out_dir=tmp_path / "run")
    with pytest.raises(TrainingStopped) as stopped:
        train(**args, callbacks=callbacks)
    assert pruning.pruned_at == 3 and stopped.value.step == 3
    state = read_state(tmp_path / "run" / "last")
    assert state["step"] == 3 and state["done"] is False
    assert list(study.trials[1].intermediate_values) == [3] and study.trials[1].state == TrialState.RUNNING

    resumed = train(**args)  # the same config later, outside the sweep: resumes from last/ and finishes
    assert resumed.resumed_from_step == 3 and resumed.steps > 3 and read_state(tmp_path / "run" / "last")["done"] is True


def test_a_trial_better_than_the_median_is_not_pruned(tmp_path):
    study = open_study(SweepConfig(pruner_startup_trials=1), "keep", str(tmp_path / "study.journal"))
    done = study.ask()
    done.report(5.0, 3)
    study.tell(done, 5.0)
    pruning = Pruning(study.ask())
    assert pruning.validated(3, 4.0) is False and pruning.validated(6, float("nan")) is False
    assert pruning.validated(9, 4.5) is False and pruning.pruned_at is None  # no finished trial reached step 9


OPEN_AT = """import sys, time
from model.training.sweep import open_storage
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))  # every process opens the storage at the same moment
open_storage(sys.argv[1])
print("opened")
"""


def test_sweeps_started_at_once_on_a_fresh_postgresql_database_all_open_it():
    """Optuna makes its tables unlocked: without the schema lock one of several sweeps racing on an empty database failed
    on a duplicate `alembic_version` (seen in CI); each must open the study's storage."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    import optuna

    from tests.postgres import fresh_database, postgres_problem

    if (why := postgres_problem()) is not None:
        pytest.skip(why)
    repo = Path(__file__).resolve().parents[2]
    with fresh_database("homer_schema") as db:
        start = time.time() + 8  # after every interpreter has imported optuna, on a slow machine too
        procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT, db.url, str(start)], cwd=repo, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(4)]
        outputs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, "\n".join(o[-2000:] for o in outputs)
        optuna.create_study(study_name="after", storage=db.url)  # the tables are whole
        assert optuna.get_all_study_names(storage=db.url) == ["after"]


def test_trials_a_gone_sweep_left_running_are_told_failed_and_no_live_ones(tmp_path):
    """A sweep process killed outright leaves its trials RUNNING; the next sweep on the study tells them failed."""
    import json
    import socket
    import subprocess
    import sys
    import textwrap

    from optuna.trial import TrialState

    from model.training.sweep import OWNER_ATTR, claim_trial, fail_abandoned_trials

    storage = str(tmp_path / "study.journal")
    # a real sweep process asks a trial, claims it and is killed before it tells
    asker = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from model.training.sweep import SweepConfig, claim_trial, open_study
        trial = open_study(SweepConfig(), "s", {storage!r}).ask()
        claim_trial(trial, "run-of-the-killed-sweep")
        print(trial.number, flush=True)
        time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    killed_number = int(asker.stdout.readline())
    asker.kill()
    asker.wait()

    study = open_study(SweepConfig(), "s", storage)
    live = study.ask()  # this process's: still running
    claim_trial(live, None)
    elsewhere = {state: study.ask() for state in ("ended", "running", "unknown")}  # asked on other hosts
    for state, trial in elsewhere.items():
        trial.set_user_attr(OWNER_ATTR, {"host": "another-host", "process": "1:1", "flow_run": f"run-{state}"})
    sibling = study.ask()  # a second trial of the same running sweep: its run is asked about once
    sibling.set_user_attr(OWNER_ATTR, {"host": "another-host", "process": "1:1", "flow_run": "run-running"})
    unclaimed = study.ask()  # asked by an older version: left alone
    asked = []

    def flow_run_ended(run_id: str):
        asked.append(run_id)
        return {"run-ended": True, "run-running": False}.get(run_id)

    failed = fail_abandoned_trials(study, flow_run_ended)
    assert sorted(failed) == sorted([killed_number, elsewhere["ended"].number])
    states = {t.number: t.state for t in study.get_trials()}
    assert states[killed_number] == states[elsewhere["ended"].number] == TrialState.FAIL
    assert all(states[t.number] == TrialState.RUNNING for t in (live, elsewhere["running"], elsewhere["unknown"], unclaimed))
    assert states[sibling.number] == TrialState.RUNNING
    assert sorted(asked) == ["run-ended", "run-running", "run-unknown"]  # this host's trials are judged by their process
    owner = study.trials[live.number].user_attrs[OWNER_ATTR]
    assert owner["host"] == socket.gethostname() and json.dumps(owner)
    assert fail_abandoned_trials(study, flow_run_ended) == []  # nothing twice
