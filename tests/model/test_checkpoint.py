import json
import os
import random

import numpy as np
import pytest
import torch

import model.network.checkpoint as ckpt
from model.network.checkpoint import (CheckpointError, load_checkpoint, load_model_from_checkpoint, read_state,
                              resolve_checkpoint, save_checkpoint)
from model.network.rnn import ModelConfig, build_model
from model.data.vocab import build_vocab, count_chars


@pytest.fixture
def setup(tiny_model_config):
    """A model and Adam optimizer after two steps, so the optimizer has state."""
    torch.manual_seed(0)
    vocab = build_vocab(count_chars(["hello homer"]))
    model = build_model(tiny_model_config, vocab.size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        logits, _ = model(torch.randint(0, vocab.size, (2, 5)))
        opt.zero_grad()
        logits.square().mean().backward()
        opt.step()
    return model, opt, vocab, tiny_model_config


def _save(path, model, opt, vocab, cfg, step=2):
    return save_checkpoint(path, model=model, vocab=vocab, model_config=cfg, optimizer=opt,
                           state={"step": step, "lr": 1e-3})


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path, setup):
    model, opt, vocab, cfg = setup
    _save(tmp_path / "last", model, opt, vocab, cfg)
    expected = _draws()  # what the RNGs give right after the save
    assert sorted(os.listdir(tmp_path / "last")) == [
        "model.safetensors", "optimizer.json", "optimizer.safetensors", "state.json", "vocab.json"]

    torch.manual_seed(123)
    model2 = build_model(cfg, vocab.size)
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.5)
    state = load_checkpoint(tmp_path / "last", model2, opt2, vocab=vocab, model_config=cfg, restore_rng_state=True)
    assert _draws() == expected
    assert state["step"] == 2 and state["vocab_fingerprint"] == vocab.fingerprint
    assert state["model_config"] == cfg.model_dump()
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), k
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for pid in s1["state"]:
        for name, value in s1["state"][pid].items():
            assert torch.equal(value, s2["state"][pid][name]), (pid, name)


def test_load_model_from_checkpoint_is_self_describing(tmp_path, setup):
    model, opt, vocab, cfg = setup
    _save(tmp_path / "best", model, None, vocab, cfg)
    loaded, loaded_vocab, state = load_model_from_checkpoint(tmp_path / "best", device="cpu")
    assert loaded_vocab == vocab and not loaded.training
    assert torch.equal(loaded.head.weight, model.head.weight)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(tmp_path / "best", build_model(cfg, vocab.size), opt)


def test_crash_between_renames_leaves_previous_checkpoint_loadable(tmp_path, setup, monkeypatch):
    model, opt, vocab, cfg = setup
    _save(tmp_path / "last", model, opt, vocab, cfg, step=1)
    real_replace = os.replace

    def crash_on_new_into_place(src, dst):
        if str(src).endswith(f".tmp-{os.getpid()}"):
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_new_into_place)
    with pytest.raises(OSError, match="simulated"):
        _save(tmp_path / "last", model, opt, vocab, cfg, step=2)
    assert not (tmp_path / "last").exists() and (tmp_path / "last.old").is_dir()
    assert resolve_checkpoint(tmp_path / "last") == tmp_path / "last.old"
    state = load_checkpoint(tmp_path / "last", build_model(cfg, vocab.size), torch.optim.Adam(model.parameters()))
    assert state["step"] == 1

    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    _save(tmp_path / "last", model, opt, vocab, cfg, step=3)  # the next save repairs the layout
    assert read_state(tmp_path / "last")["step"] == 3
    assert not (tmp_path / "last.old").exists()


def test_crash_while_writing_keeps_old_checkpoint(tmp_path, setup, monkeypatch):
    model, opt, vocab, cfg = setup
    _save(tmp_path / "last", model, opt, vocab, cfg, step=1)
    monkeypatch.setattr(ckpt, "capture_rng", lambda *_: 1 / 0)  # dies before state.json is complete
    with pytest.raises(ZeroDivisionError):
        _save(tmp_path / "last", model, opt, vocab, cfg, step=2)
    assert read_state(tmp_path / "last")["step"] == 1


def test_vocabulary_mismatch_names_both_fingerprints(tmp_path, setup):
    model, opt, vocab, cfg = setup
    _save(tmp_path / "last", model, opt, vocab, cfg)
    other = build_vocab(count_chars(["something else entirely"]))
    with pytest.raises(CheckpointError, match=f"vocabulary {vocab.fingerprint} but the shards use {other.fingerprint}"):
        load_checkpoint(tmp_path / "last", build_model(cfg, other.size), vocab=other)


def test_architecture_mismatch_names_the_field(tmp_path, setup):
    model, opt, vocab, cfg = setup
    _save(tmp_path / "last", model, opt, vocab, cfg)
    wider = ModelConfig(**{**cfg.model_dump(), "hidden_sizes": [48]})
    with pytest.raises(CheckpointError, match=r"different architecture \(hidden_sizes: checkpoint \[32\] vs asked \[48\]"):
        load_checkpoint(tmp_path / "last", build_model(wider, vocab.size), vocab=vocab, model_config=wider)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        read_state(tmp_path / "nothing")


def test_state_json_is_plain_json(tmp_path, setup):
    model, opt, vocab, cfg = setup
    _save(tmp_path / "last", model, opt, vocab, cfg)
    state = json.loads((tmp_path / "last" / "state.json").read_text())
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert state["num_parameters"] == sum(p.numel() for p in model.parameters())
