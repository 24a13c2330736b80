"""A training stage on two processes under Prefect: torchrun launched from the task, a rank
killed mid-run, and the task's own retry resuming from the last committed step."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from flows.config import load_config
from model.network.checkpoint import load_model_from_checkpoint, read_state
from model.store.outputs import read_manifest
from model.training.distributed import rank_pids

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]

TWO_PROCESSES = [
    "pretrain.model.embedding_dim=16", "pretrain.model.hidden_sizes=[32]", "pretrain.model.dropout=0.0",
    "pretrain.train.max_steps=40", "pretrain.train.batch_size=16", "pretrain.train.checkpoint_every_steps=3",
    "pretrain.train.log_every_steps=2", "pretrain.train.max_val_windows=32", "pretrain.train.num_threads=1",
    "pretrain.train.nproc_per_node=2",
]


def _left(record: dict) -> bool:
    """Whether a recorded rank still runs (same PID and start time, not a zombie)."""
    try:
        fields = Path(f"/proc/{record['pid']}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == record["start"] and fields[0] != "Z"


def test_pretrain_on_two_processes_resumes_after_a_killed_rank_through_the_task_retry(data_dir, tmp_path, monkeypatch):
    import tasks.train as train_tasks
    from flows.ingest_simpsons import ingest_simpsons
    from flows.ingest_wikipedia import ingest_wikipedia
    from flows.prepare import prepare
    from flows.pretrain import pretrain

    cfg = load_config("sample", None, TWO_PROCESSES)
    ingest_wikipedia(cfg.wikipedia)
    ingest_simpsons(cfg.simpsons)
    prepare(cfg.prepare)

    runs = tmp_path / "runs"
    monkeypatch.setenv("HOMER_DDP_RUNS", str(runs))
    original, killed = train_tasks.prefect_callbacks, []

    def killing_rank_1_once(*args, **kwargs):
        callbacks, finished = original(*args, **kwargs)

        def on_checkpoint(kind: str, path: Path) -> None:  # replayed in the task from rank 0's events
            if kind == "last" and not killed:
                (run_dir,) = runs.iterdir()
                recorded = rank_pids(run_dir)
                os.kill(recorded[1]["pid"], signal.SIGKILL)
                killed.append({"step": read_state(path)["step"], "ranks": list(recorded.values())})

        callbacks.on_checkpoint = on_checkpoint
        return callbacks, finished

    monkeypatch.setattr(train_tasks, "prefect_callbacks", killing_rank_1_once)
    ref = pretrain(cfg.pretrain)

    manifest = read_manifest(ref.dir)
    assert killed and manifest["counts"]["world_size"] == 2 and manifest["config"]["train"]["nproc_per_node"] == 2
    assert manifest["counts"]["resumed_from_step"] >= killed[0]["step"] > 0  # the retry resumed, it did not start over
    assert manifest["counts"]["steps"] == 40
    assert not [r for r in killed[0]["ranks"] if _left(r)]  # the first attempt's ranks are gone
    failed = [p for p in runs.iterdir()]  # the failed attempt's run directory stays (torchrun's log), the retry's is gone
    assert len(failed) == 1 and (failed[0] / "torchrun.log").is_file()
    load_model_from_checkpoint(ref.dir / "best")
