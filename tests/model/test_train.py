import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from model.network.checkpoint import CheckpointError, load_model_from_checkpoint, read_state
from model.network.rnn import ModelConfig
from model.data.shards import ShardError, read_overlap
from model.training.loop import (NonFiniteLossError, TrainCallbacks, TrainConfig, TrainingStopped, _parse_overrides, evaluate,
                         lr_at_epoch, read_windows, train)
from model.data.vocab import build_vocab, count_chars

REPO = Path(__file__).resolve().parents[2]


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"batch_size": 8, "epochs": 3, "log_every_steps": 3, "early_stopping_patience": None,
                          "device": "cpu", **kw})


def _metric_lines(out_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in d.items() if k != "chars_per_s"} for d in lines]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_config_reports_every_bad_field_at_once():
    with pytest.raises(ValidationError) as err:
        TrainConfig(learning_rate=0, batch_size=0, precision="fp8", device="gpu7", early_stopping_patience=0, bogus=1)
    assert {e["loc"][0] for e in err.value.errors()} == {
        "learning_rate", "batch_size", "precision", "device", "early_stopping_patience", "bogus"}


def test_lr_schedule_is_constant_then_decays_by_exp_minus_0_1_per_epoch():
    cfg = TrainConfig(learning_rate=1e-3, constant_epochs=2)
    assert [lr_at_epoch(cfg, e) for e in range(2)] == [1e-3, 1e-3]
    assert lr_at_epoch(cfg, 2) == pytest.approx(1e-3 * math.exp(-0.1))
    assert lr_at_epoch(cfg, 4) == pytest.approx(1e-3 * math.exp(-0.3))
    finetune = TrainConfig(learning_rate=1e-5, constant_epochs=4)
    assert [lr_at_epoch(finetune, e) for e in (3, 4, 5)] == pytest.approx([1e-5, 1e-5 * math.exp(-0.1), 1e-5 * math.exp(-0.2)])


def test_loss_goes_down_and_outputs_are_written(tmp_path, corpus, tiny_model_config):
    logs, epochs, checkpoints = [], [], []
    cbs = TrainCallbacks(on_log=logs.append, on_epoch_end=epochs.append,
                         on_checkpoint=lambda kind, path: checkpoints.append(kind))
    result = train(model_config=tiny_model_config, train_config=_cfg(learning_rate=1e-2, epochs=6), shards_dir=corpus.shards,
                   out_dir=tmp_path / "run", vocab=corpus.vocab, callbacks=cbs)
    assert result.steps == 36 and result.epochs == 6 and result.resumed_from_step is None
    assert logs[-1]["loss"] < 0.7 * logs[0]["loss"]
    assert result.history == epochs and epochs[-1]["val_loss"] < epochs[0]["val_loss"]
    assert result.best_val_bpc == pytest.approx(result.best_val_loss / math.log(2))
    assert epochs[-1]["val_ppl"] == pytest.approx(math.exp(epochs[-1]["val_loss"]))
    assert set(logs[0]) == {"step", "epoch", "loss", "chars_per_s", "lr"} and result.train_chars_per_s > 0
    assert "best" in checkpoints and checkpoints[-1] == "last"
    assert read_state(tmp_path / "run" / "last")["done"] is True
    assert [d["kind"] for d in _metric_lines(tmp_path / "run")].count("epoch") == 6


def test_finished_run_is_returned_without_training(tmp_path, corpus, tiny_model_config):
    args = dict(model_config=tiny_model_config, train_config=_cfg(epochs=1), shards_dir=corpus.shards,
                out_dir=tmp_path / "run", vocab=corpus.vocab)
    first = train(**args)
    mtime = (tmp_path / "run" / "last" / "state.json").stat().st_mtime_ns
    again = train(**args)
    assert (tmp_path / "run" / "last" / "state.json").stat().st_mtime_ns == mtime
    assert again.history == first.history and again.steps == first.steps and again.resumed_from_step == first.steps


def test_a_stop_during_validation_resumes_with_that_validation(tmp_path, corpus, tiny_model_config):
    """A cancel must not wait for a long validation: it stops between validation batches, and the resume redoes it."""
    cfg = _cfg(checkpoint_every_steps=4, eval_every_steps=5, max_val_windows=None)
    args = dict(model_config=tiny_model_config, train_config=cfg, shards_dir=corpus.shards, vocab=corpus.vocab)
    train(**args, out_dir=tmp_path / "straight")
    at, asked = {"step": 0}, []

    def stop_inside_the_step_5_validation() -> bool:
        if at["step"] == 5 and not asked:
            asked.append(True)
            return True
        return False

    callbacks = TrainCallbacks(on_step=lambda step, _epoch: at.update(step=step), should_stop=stop_inside_the_step_5_validation)
    with pytest.raises(TrainingStopped) as stopped:
        train(**args, out_dir=tmp_path / "resumed", callbacks=callbacks)
    state = read_state(tmp_path / "resumed" / "last")
    assert stopped.value.step == 5 and state["validation_pending"] and state["metrics"]["last_eval_step"] != 5
    train(**args, out_dir=tmp_path / "resumed")
    _assert_same_weights(tmp_path / "straight" / "last", tmp_path / "resumed" / "last")
    _assert_same_weights(tmp_path / "straight" / "best", tmp_path / "resumed" / "best")
    assert _metric_lines(tmp_path / "straight") == _metric_lines(tmp_path / "resumed")


def test_stop_and_resume_in_process_is_bit_identical(tmp_path, corpus, tiny_model_config):
    cfg = _cfg(checkpoint_every_steps=4, eval_every_steps=5)
    args = dict(model_config=tiny_model_config, train_config=cfg, shards_dir=corpus.shards, vocab=corpus.vocab)
    train(**args, out_dir=tmp_path / "straight")
    at = {"step": 0}
    stop_before_step_8 = TrainCallbacks(on_step=lambda step, _epoch: at.update(step=step), should_stop=lambda: at["step"] >= 7)
    with pytest.raises(TrainingStopped) as stopped:
        train(**args, out_dir=tmp_path / "resumed", callbacks=stop_before_step_8)
    assert stopped.value.step == 7 and read_state(tmp_path / "resumed" / "last")["batch_in_epoch"] == 1
    result = train(**args, out_dir=tmp_path / "resumed")
    assert result.resumed_from_step == 7
    _assert_same_weights(tmp_path / "straight" / "last", tmp_path / "resumed" / "last")
    _assert_same_weights(tmp_path / "straight" / "best", tmp_path / "resumed" / "best")
    assert _metric_lines(tmp_path / "straight") == _metric_lines(tmp_path / "resumed")


def test_early_stopping_keeps_best(tmp_path, tiny_model_config, write_shards):
    # trained on a->b->c->d, validated on a->d->c->b: validation only gets worse as it learns
    vocab = build_vocab(count_chars(["abcd"]))
    shards = write_shards(tmp_path / "shards", vocab, "abcd" * 200, "adcb" * 40)
    result = train(model_config=tiny_model_config, shards_dir=shards, out_dir=tmp_path / "run", vocab=vocab,
                   train_config=_cfg(learning_rate=1e-2, epochs=20, eval_every_steps=2, early_stopping_patience=2))
    assert result.stopped_early and result.epochs < 20
    best = read_state(tmp_path / "run" / "best")
    assert best["metrics"]["best_val_loss"] == result.best_val_loss < result.last_val_loss
    model, _, _ = load_model_from_checkpoint(tmp_path / "run" / "best")
    val = read_windows(shards, "val", vocab)
    assert evaluate(model, val, batch_size=32, device=torch.device("cpu"), overlap=read_overlap(shards, "val")) == pytest.approx(
        result.best_val_loss, rel=1e-6)


def test_nonfinite_loss_raises_and_keeps_last_good_checkpoint(tmp_path, corpus, tiny_model_config):
    args = dict(model_config=tiny_model_config, shards_dir=corpus.shards, out_dir=tmp_path / "run", vocab=corpus.vocab)
    at = {"step": 0}
    with pytest.raises(TrainingStopped):  # a good checkpoint at step 4
        train(**args, train_config=_cfg(), callbacks=TrainCallbacks(on_step=lambda step, _epoch: at.update(step=step),
                                                                    should_stop=lambda: at["step"] >= 4))
    good = (tmp_path / "run" / "last" / "model.safetensors").read_bytes()
    # then a learning rate so high that Adam's first update overflows the next forward pass
    with pytest.raises(NonFiniteLossError, match="at step 6") as err:
        train(**args, train_config=_cfg(learning_rate=1e36))
    assert err.value.step == 6
    assert (tmp_path / "run" / "last" / "model.safetensors").read_bytes() == good
    model, _, state = load_model_from_checkpoint(tmp_path / "run" / "last")
    assert state["step"] == 4 and all(torch.isfinite(p).all() for p in model.parameters())


def test_finetune_starts_from_checkpoint_weights(tmp_path, corpus, tiny_model_config):
    args = dict(model_config=tiny_model_config, shards_dir=corpus.shards, vocab=corpus.vocab)
    pre = train(**args, out_dir=tmp_path / "pre", train_config=_cfg(learning_rate=1e-2, epochs=4))
    fine = train(**args, out_dir=tmp_path / "fine", init_from=tmp_path / "pre" / "best",
                 train_config=_cfg(learning_rate=1e-9, epochs=1))
    assert fine.steps == 6 and fine.resumed_from_step is None
    assert fine.last_val_loss == pytest.approx(pre.best_val_loss, abs=1e-3)
    state = read_state(tmp_path / "fine" / "last")
    assert state["init_from"].endswith("best") and state["train_config"]["learning_rate"] == 1e-9
    other = ModelConfig(**{**tiny_model_config.model_dump(), "cell": "lstm"})
    with pytest.raises(CheckpointError, match="cell: checkpoint 'gru' vs asked 'lstm'"):
        train(**{**args, "model_config": other}, out_dir=tmp_path / "bad", init_from=tmp_path / "pre" / "best",
              train_config=_cfg())


def test_shards_of_another_vocabulary_are_refused(tmp_path, corpus, tiny_model_config):
    other = build_vocab(count_chars([corpus.text + "xyz"]))
    with pytest.raises(ShardError, match=f"vocabulary {corpus.vocab.fingerprint} but the vocabulary given is {other.fingerprint}"):
        train(model_config=tiny_model_config, train_config=_cfg(), shards_dir=corpus.shards, out_dir=tmp_path / "r", vocab=other)


def test_mixed_precision_needs_cuda(tmp_path, corpus, tiny_model_config):
    with pytest.raises(ValueError, match="precision=bf16 needs a CUDA device"):
        train(model_config=tiny_model_config, train_config=_cfg(precision="bf16"), shards_dir=corpus.shards,
              out_dir=tmp_path / "r", vocab=corpus.vocab)


def test_cli_overrides():
    assert _parse_overrides(["epochs=2", "model.hidden_sizes=[8, 8]", "train.device=cpu", "dropout=0.2"]) == {
        "train": {"epochs": 2, "device": "cpu"}, "model": {"hidden_sizes": [8, 8], "dropout": 0.2}}
    with pytest.raises(ValueError, match="expected dotted.key=value"):
        _parse_overrides(["epochs"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cuda_trains_and_resumes(tmp_path, corpus, tiny_model_config, precision):
    cfg = _cfg(precision=precision, device="cuda", checkpoint_every_steps=4)
    args = dict(model_config=tiny_model_config, train_config=cfg, shards_dir=corpus.shards, vocab=corpus.vocab,
                out_dir=tmp_path / "run")
    at = {"step": 0}  # (should_stop is also polled by the watching thread: count steps, not calls)
    with pytest.raises(TrainingStopped):
        train(**args, callbacks=TrainCallbacks(on_step=lambda step, _epoch: at.update(step=step), should_stop=lambda: at["step"] >= 5))
    result = train(**args)
    assert result.resumed_from_step == 5 and math.isfinite(result.last_val_loss)
    assert (read_state(tmp_path / "run" / "last")["grad_scaler"] is not None) == (precision == "fp16")


@pytest.mark.slow
def test_sigkill_and_restart_gives_bit_identical_weights(tmp_path, corpus, tiny_model_config, write_shards):
    vocab = corpus.vocab
    shards = write_shards(tmp_path / "long", vocab, corpus.text * 80, corpus.text * 5, rows_per_shard=100)
    vocab.save(tmp_path / "vocab.json")
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def start(out: str) -> subprocess.Popen:
        # Two trainings at once share the cores, and a thread count that changes mid-run changes the floating
        # point: bit-identical resume holds for a pinned num_threads (README, "Training, resuming, generating").
        sets = ["epochs=3", "batch_size=8", "checkpoint_every_steps=7", "log_every_steps=10", "device=cpu", "num_threads=1",
                "early_stopping_patience=null", *(f"model.{k}={json.dumps(v)}" for k, v in tiny_model_config.model_dump().items())]
        cmd = [sys.executable, "-m", "model.training.loop", "--shards", str(shards), "--vocab", str(tmp_path / "vocab.json"),
               "--out", str(tmp_path / out), *(a for s in sets for a in ("--set", s))]
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    reference, victim = start("reference"), start("killed")
    state_path, deadline = tmp_path / "killed" / "last" / "state.json", time.monotonic() + 60
    while True:  # wait for a mid-epoch checkpoint past the first epoch
        assert victim.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError):
            state = None
        if state and state["epoch"] >= 1 and state["batch_in_epoch"] > 0:
            break
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not read_state(tmp_path / "killed" / "last")["done"]

    restarted = start("killed")
    out, _ = restarted.communicate(timeout=120)
    assert restarted.returncode == 0
    assert json.loads(out)["resumed_from_step"] > 0
    reference.communicate(timeout=120)
    assert reference.returncode == 0
    _assert_same_weights(tmp_path / "reference" / "last", tmp_path / "killed" / "last")
    assert _metric_lines(tmp_path / "reference") == _metric_lines(tmp_path / "killed")


def test_evaluation_scores_each_character_once(tiny_model_config):
    """A document's last, end-aligned window overlaps the one before: its repeated targets are skipped."""
    from model.network.rnn import build_model
    from model.data.prepare import windows_of
    from model.training.loop import scored_chars

    text = "Mmm... doughnuts. Is there anything they can't do?"  # 50 characters
    vocab = build_vocab(count_chars([text]))
    windows, _, overlap = windows_of(vocab.encode(text), torch.tensor([len(text)]).numpy(), seq_len=16)
    assert overlap.tolist() == [0, 0, 0, 15] and scored_chars(windows, overlap) == len(text) - 1
    torch.manual_seed(0)
    model = build_model(tiny_model_config, vocab.size).eval()
    batch = torch.from_numpy(windows.astype("int64"))  # (W, T + 1)
    with torch.no_grad():
        logits, _ = model(batch[:, :-1])  # (W, T, V)
        per_target = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none").view(4, 16)
    once = torch.cat([per_target[:3].flatten(), per_target[3, 15:]]).double().mean().item()
    got = evaluate(model, windows, batch_size=3, device=torch.device("cpu"), overlap=overlap)
    assert got == pytest.approx(once, rel=1e-6)
    assert evaluate(model, windows, batch_size=3, device=torch.device("cpu")) != pytest.approx(once, rel=1e-6)


def test_auto_precision_is_fp32_on_every_device():
    """bf16 stays an explicit choice until a GPU run shows it reaches the fp32 loss, faster."""
    from model.training.loop import resolve_precision

    assert TrainConfig().precision == "auto"
    assert resolve_precision("auto", torch.device("cpu")) is None
    assert resolve_precision("auto", torch.device("cuda")) is None
    assert resolve_precision("bf16", torch.device("cuda")) is torch.bfloat16
    assert resolve_precision("fp16", torch.device("cuda")) is torch.float16


@pytest.mark.parametrize("eval_every_steps", [0, 3], ids=["inside-a-step", "inside-a-validation"])
def test_a_stop_inside_a_slow_computation_saves_the_boundary_before_it_and_resumes_exactly(
        tmp_path, corpus, tiny_model_config, write_shards, caplog, eval_every_steps):
    """A cancel must not wait for a step of a large model (tens of seconds on a CPU): the watching thread saves
    last/ from the state at the start of the computation in progress, and the resume is bit-identical."""
    import threading

    shards = write_shards(tmp_path / "long", corpus.vocab, corpus.text * 40, corpus.text * 20, rows_per_shard=100)
    cfg = _cfg(epochs=12, checkpoint_every_steps=50, eval_every_steps=eval_every_steps, max_val_windows=None, num_threads=1)
    args = dict(model_config=tiny_model_config, train_config=cfg, shards_dir=shards, vocab=corpus.vocab)
    train(**args, out_dir=tmp_path / "straight")
    at = {"step": 0}
    # Only the watching thread sees this stop, so the training thread never stops at a boundary by itself:
    # the run can end only by the watching thread saving from inside a computation.
    only_the_watcher_sees_it = TrainCallbacks(
        on_step=lambda step, _epoch: at.update(step=step),
        should_stop=lambda: threading.current_thread() is threading.main_thread() and at["step"] >= 20)
    with caplog.at_level("INFO", logger="model.training.loop"), pytest.raises(TrainingStopped) as stopped:
        train(**args, out_dir=tmp_path / "resumed", callbacks=only_the_watcher_sees_it, stop_grace_s=0.0)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopped inside a")]
    assert len(said) == 1, said
    state = read_state(tmp_path / "resumed" / "last")
    assert state["step"] == stopped.value.step >= 20 and not state["done"]
    assert state["validation_pending"] == ("validation" in said[0])
    time.sleep(0.5)  # the abandoned training thread must write nothing after the save
    assert read_state(tmp_path / "resumed" / "last")["step"] == stopped.value.step
    result = train(**args, out_dir=tmp_path / "resumed")
    assert result.resumed_from_step == stopped.value.step
    _assert_same_weights(tmp_path / "straight" / "last", tmp_path / "resumed" / "last")
    _assert_same_weights(tmp_path / "straight" / "best", tmp_path / "resumed" / "best")
    assert _metric_lines(tmp_path / "straight") == _metric_lines(tmp_path / "resumed")
