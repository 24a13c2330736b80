"""Training on several processes: real torchrun launches of two gloo ranks on the CPU.

One module-scoped two-process run (dropout on) is the reference the stop-and-resume test
compares against; the others launch their own. Each launch costs a few seconds of process
start-up (torchrun and each rank import torch).
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from model.network.checkpoint import read_state
from model.network.rnn import ModelConfig
from model.store.outputs import fingerprint_view
from model.training.distributed import DDPRanks, DistributedTrainingError, launch, rank_pids
from model.training.loop import TrainCallbacks, TrainConfig, TrainingStopped, train
from model.data.vocab import build_vocab, count_chars
from tests.model.conftest import TEXT, _write_shards

MODEL = ModelConfig(embedding_dim=16, hidden_sizes=[32], dropout=0.1)


def _cfg(**kw) -> TrainConfig:
    # num_threads=1: a thread count that changed mid-run would change the floating point (README)
    return TrainConfig(**{"batch_size": 8, "epochs": 3, "log_every_steps": 4, "checkpoint_every_steps": 5,
                          "early_stopping_patience": None, "device": "cpu", "num_threads": 1, "nproc_per_node": 2, **kw})


def _metric_lines(out_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in d.items() if k != "chars_per_s"} for d in lines]


def _weights(run: Path, which: str = "last") -> dict[str, torch.Tensor]:
    return load_file(run / which / "model.safetensors")


def _process_left(record: dict) -> bool:
    """Whether the recorded process still runs: same PID and start time, and not a zombie."""
    try:
        fields = Path(f"/proc/{record['pid']}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == record["start"] and fields[0] != "Z"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    vocab = build_vocab(count_chars([TEXT]))
    shards = _write_shards(root / "shards", vocab, TEXT * 40, TEXT * 3)  # ~122 train windows: 16 batches of 8 an epoch
    return root, vocab, shards


@pytest.fixture
def runs(tmp_path, monkeypatch) -> Path:
    """Where launch() makes its run directories (rank PIDs, events, torchrun's log) for this test."""
    monkeypatch.setenv("HOMER_DDP_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"


def _signal_rank_at(runs: Path, rank: int, sig: int, step: int = 1) -> TrainCallbacks:
    """Callbacks that send `sig` to `rank` (as it recorded itself) once rank 0 reports `step`; records what was sent.

    Rank 0 reports its first step at once, later ones every 0.25 s: step 1 reaches the launcher
    while the run is young on any machine.
    """
    sent: list[dict] = []

    def on_step(at: int, _epoch: int) -> None:
        if at >= step and not sent:
            (run_dir,) = runs.iterdir()
            recorded = rank_pids(run_dir)
            os.kill(recorded[rank]["pid"], sig)
            sent.append(dict(recorded[rank], step=at, ranks=list(recorded.values())))

    callbacks = TrainCallbacks(on_step=on_step)
    callbacks.sent = sent
    return callbacks


@pytest.fixture(scope="module")
def reference(data):
    """An uninterrupted two-process run with dropout, rank RNGs and all."""
    root, vocab, shards = data
    result = launch(model_config=MODEL, train_config=_cfg(), shards_dir=shards, out_dir=root / "reference", vocab=vocab)
    return root / "reference", result


def test_world_size_is_checked_with_every_other_problem():
    with pytest.raises(ValidationError) as err:
        TrainConfig(batch_size=10, nproc_per_node=4, learning_rate=0)
    problems = {e["loc"][0]: e["msg"] for e in err.value.errors()}
    assert set(problems) == {"learning_rate", "batch_size"}  # the field errors and the world size at once
    assert "batch_size 10" in problems["batch_size"] and "nproc_per_node × nnodes = 4 × 1 = 4" in problems["batch_size"]

    with pytest.raises(ValidationError) as err:
        TrainConfig(batch_size=10, nproc_per_node=2, nnodes=2, device="cuda:1", rdzv_id="x")
    problems = {e["loc"][0]: e["msg"] for e in err.value.errors()}
    assert set(problems) == {"batch_size", "rdzv_endpoint", "device"}
    assert "nnodes=2 needs rdzv_endpoint" in problems["rdzv_endpoint"] and "cuda:LOCAL_RANK" in problems["device"]

    with pytest.raises(ValidationError, match="expected host:port"):
        TrainConfig(rdzv_endpoint="node0")
    ok = TrainConfig(batch_size=64, nproc_per_node=2, nnodes=2, rdzv_endpoint="node0:29400")
    assert ok.world_size == 4 and TrainConfig().world_size == 1

    # the world size changes the floating point: in the fingerprint; where the processes meet is not
    view = fingerprint_view(ok)
    assert view["nproc_per_node"] == 2 and view["nnodes"] == 2 and "rdzv_endpoint" not in view and "rdzv_id" not in view


def test_each_rank_takes_its_contiguous_slice_of_the_global_batch():
    ranks = [DDPRanks(r, 2, torch.device("cpu")) for r in range(2)]
    idx = np.arange(100, 108)
    assert [r.batch(idx)[0].tolist() for r in ranks] == [[100, 101, 102, 103], [104, 105, 106, 107]]
    assert [r.batch(idx)[1] for r in ranks] == [1.0, 1.0]
    # an epoch's last, smaller batch: uneven slices, weighted so that DDP's mean is the batch's mean gradient
    assert [(r.batch(idx[:5])[0].tolist(), r.batch(idx[:5])[1]) for r in ranks] == [([100, 101, 102], 1.2), ([103, 104], 0.8)]
    assert [(r.batch(idx[:1])[0].tolist(), r.batch(idx[:1])[1]) for r in ranks] == [([100], 2.0), ([100], 0.0)]  # a stand-in
    assert np.concatenate([r.share(np.arange(7)) for r in ranks]).tolist() == list(range(7))

    def mask(rank: int, step: int) -> torch.Tensor:
        ranks[rank].reseed(3, 1, step)
        return torch.rand(4)

    assert torch.equal(mask(0, 5), mask(0, 5)) and not torch.equal(mask(0, 5), mask(1, 5)) and not torch.equal(mask(0, 5), mask(0, 6))


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, data, runs):
    _root, vocab, shards = data
    model = ModelConfig(**{**MODEL.model_dump(), "dropout": 0.0})  # dropout masks differ by rank; nothing else does
    args = dict(model_config=model, shards_dir=shards, vocab=vocab)
    one = train(**args, train_config=_cfg(nproc_per_node=1), out_dir=tmp_path / "one")
    two = launch(**args, train_config=_cfg(), out_dir=tmp_path / "two")
    assert two.steps == one.steps == 48 and two.epochs == one.epochs == 3
    for k, w in _weights(tmp_path / "one").items():  # within 1e-5 of each tensor's scale
        torch.testing.assert_close(_weights(tmp_path / "two")[k], w, rtol=0, atol=1e-5 * w.abs().max().item())
    for a, b in zip(_metric_lines(tmp_path / "one"), _metric_lines(tmp_path / "two"), strict=True):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        for key in ("loss", "val_loss", "train_loss"):
            if key in a:
                assert math.isclose(a[key], b[key], rel_tol=1e-5), (key, a, b)
    state = read_state(tmp_path / "two" / "last")
    assert state["metrics"]["train_chars"] == read_state(tmp_path / "one" / "last")["metrics"]["train_chars"]  # global batches
    assert state["train_config"]["nproc_per_node"] == 2 and not list(runs.iterdir())  # a finished launch tidies up


@pytest.mark.slow
def test_a_stop_to_one_rank_saves_last_and_resumes_exactly(data, runs, reference):
    root, vocab, shards = data
    reference_dir, reference_result = reference
    args = dict(model_config=MODEL, train_config=_cfg(), shards_dir=shards, vocab=vocab, out_dir=root / "stopped")
    callbacks = _signal_rank_at(runs, rank=1, sig=signal.SIGTERM)
    with pytest.raises(TrainingStopped) as stopped:
        launch(**args, callbacks=callbacks)
    state = read_state(root / "stopped" / "last")
    assert stopped.value.step == state["step"] >= callbacks.sent[0]["step"] and not state["done"]
    assert len(callbacks.sent[0]["ranks"]) == 2 and not any(_process_left(r) for r in callbacks.sent[0]["ranks"])

    result = launch(**args)
    assert result.resumed_from_step == stopped.value.step and result.steps == reference_result.steps
    # bit-identical: every rank's dropout masks come from (seed, epoch, step, rank), and gloo sums in a fixed order
    for k, w in _weights(reference_dir).items():
        assert torch.equal(_weights(root / "stopped")[k], w), k
    for k, w in _weights(reference_dir, "best").items():
        assert torch.equal(_weights(root / "stopped", "best")[k], w), k
    assert _metric_lines(reference_dir) == _metric_lines(root / "stopped")


@pytest.mark.slow
def test_a_killed_rank_fails_the_launch_clearly_and_leaves_no_process(tmp_path, data, runs):
    _root, vocab, shards = data
    callbacks = _signal_rank_at(runs, rank=1, sig=signal.SIGKILL)
    with pytest.raises(DistributedTrainingError) as err:
        launch(model_config=MODEL, train_config=_cfg(epochs=50), shards_dir=shards, vocab=vocab, out_dir=tmp_path / "killed",
               callbacks=callbacks)
    pid = callbacks.sent[0]["pid"]
    assert f"rank 1 (pid {pid}) was killed by SIGKILL" in str(err.value)
    (run_dir,) = runs.iterdir()  # kept, with torchrun's log, for a look
    recorded = rank_pids(run_dir)
    assert sorted(recorded) == [0, 1] and not [r for r in recorded.values() if _process_left(r)]
    assert str(run_dir / "torchrun.log") in str(err.value)
    if (tmp_path / "killed" / "last").exists():
        assert f"last/ holds step {read_state(tmp_path / 'killed' / 'last')['step']}, and a retry resumes" in str(err.value)
    else:
        assert "no step was committed yet (no last/), so a retry starts over" in str(err.value)


# torchrun's summary as CI saw it: the rank killed from outside (SIGKILL, no error file) is stamped when the
# agent notices it, so the survivor's error file (its peer's lost connection) tied and was named root cause
TORCHRUN_SUMMARY = """\
============================================================
homer-ddp FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-03_10:01:07
  host      : ci
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 20448) (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 20448
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-03_10:01:07
  host      : ci
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 20447) (SIGTERM)
  error_file: /tmp/torchelastic/error.json
  traceback : RuntimeError: [gloo] Connection closed by peer
============================================================
"""


def test_a_rank_killed_from_outside_is_named_even_when_torchrun_names_the_survivor(tmp_path):
    from model.training.distributed import _outcome

    (tmp_path / "torchrun.log").write_text(TORCHRUN_SUMMARY, encoding="utf-8")
    (tmp_path / "error-0.json").write_text(json.dumps({"type": "RuntimeError", "message": "Connection closed by peer"}))
    with pytest.raises(DistributedTrainingError) as err:
        _outcome(1, tmp_path, tmp_path / "out", stopped=False)
    assert "rank 1 (pid 20448) was killed by SIGKILL; then rank 0: RuntimeError: Connection closed by peer" in str(err.value)
    # with no outside kill, torchrun's own root cause stands
    (tmp_path / "torchrun.log").write_text(TORCHRUN_SUMMARY.replace("-9 (pid: 20448) (SIGKILL)", "1 (pid: 20448)"))
    with pytest.raises(DistributedTrainingError) as err:
        _outcome(1, tmp_path, tmp_path / "out", stopped=False)
    assert "rank 0 (pid 20447) was killed by SIGTERM: RuntimeError: Connection closed by peer" in str(err.value)
