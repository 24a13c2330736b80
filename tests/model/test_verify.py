"""Verified outputs: manifests list every file; a damaged output is named, with the stage that remakes it, and rebuilt.

Every kind of damage on data the tests make: a truncated file, a deleted file, changed
content of the same size, a manifest that does not parse, a `latest` naming nothing, a
truncated checkpoint, a deleted or truncated shard; and `homer verify`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.data.shards import ShardError, ShardWriter, list_shards, read_split
from model.data.vocab import build_vocab, count_chars
from model.network.checkpoint import (CheckpointError, choose_model, describe_model, load_model_from_checkpoint,
                                      resolve_model, save_checkpoint)
from model.network.rnn import ModelConfig, build_model
from model.store.outputs import (CHECKSUM, MANIFEST, StoreError, is_complete, latest, manifest_for, output_state,
                                 resolve, set_latest, staging, verify_output, verify_stage, write_manifest)


def _publish(root, fp="f1", stage="prepare", body=b"x" * 100):
    with staging(root, stage, fp) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "data.bin").write_bytes(body)
        (tmp / "vocab.json").write_text("{}")
        write_manifest(tmp, manifest_for(stage, fp, {"a": 1}, {}, {"n": 1}))
    return root / stage / fp


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path):
    out = _publish(tmp_path)
    files = json.loads((out / MANIFEST).read_text())["files"]
    assert set(files) == {"sub/data.bin", "vocab.json"}
    assert files["sub/data.bin"]["size"] == 100 and len(files["sub/data.bin"][CHECKSUM]) >= 32
    assert is_complete(out) and output_state(out, checksums=True) == "complete"
    verify_output(out, checksums=True)


def test_truncated_file_is_damage_naming_the_file_sizes_and_stage(tmp_path):
    out = _publish(tmp_path)
    (out / "sub" / "data.bin").write_bytes(b"x" * 40)
    assert not is_complete(out) and output_state(out) == "damaged"
    for call in (lambda: resolve(tmp_path, "prepare", "f1"), lambda: latest(tmp_path, "prepare")):
        with pytest.raises(StoreError) as err:
            call()
        message = str(err.value)
        assert f"{out / 'sub' / 'data.bin'} is 40 bytes, the manifest says 100" in message
        assert "the prepare output" in message and "re-run `homer stage prepare`" in message
    assert "latest names f1" in str(pytest.raises(StoreError, latest, tmp_path, "prepare").value)


def test_deleted_file_and_bad_manifest_are_damage(tmp_path):
    out = _publish(tmp_path)
    (out / "vocab.json").unlink()
    with pytest.raises(StoreError, match=r"vocab.json is missing \(the manifest lists it, 2 bytes\).*homer stage prepare"):
        resolve(tmp_path, "prepare", "f1")
    other = _publish(tmp_path, "f2")
    (other / MANIFEST).write_text('{"stage": "prep')  # a torn write
    assert output_state(other) == "damaged"
    with pytest.raises(StoreError, match=r"manifest.json does not parse.*homer stage prepare"):
        resolve(tmp_path, "prepare", "f2")


def test_same_size_corruption_is_found_by_the_checksum_only(tmp_path):
    out = _publish(tmp_path)
    (out / "sub" / "data.bin").write_bytes(b"y" * 100)
    assert is_complete(out)  # sizes match: the cheap check cannot see it
    with pytest.raises(StoreError, match=r"data.bin does not match its checksum.*the prepare output .* is damaged"):
        verify_output(out, checksums=True)


def test_latest_naming_a_missing_output_names_it(tmp_path):
    set_latest(tmp_path, "prepare", "gone")
    with pytest.raises(StoreError, match=r"latest names gone, but .*prepare/gone does not exist.*homer stage prepare"):
        latest(tmp_path, "prepare")


def test_staging_over_a_damaged_output_moves_it_aside_and_rebuilds(tmp_path):
    out = _publish(tmp_path)
    (out / "sub" / "data.bin").unlink()
    _publish(tmp_path, body=b"z" * 100)
    assert is_complete(out) and (out / "sub" / "data.bin").read_bytes() == b"z" * 100
    aside = [p.name for p in (tmp_path / "prepare").iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and aside[0].startswith("f1.damaged-")
    assert latest(tmp_path, "prepare").fingerprint == "f1"


def test_a_task_rebuilds_a_damaged_output_instead_of_reusing_it(tmp_path):
    from tasks.common import complete_ref, verify_inputs

    out = _publish(tmp_path)
    assert complete_ref(tmp_path, "prepare", "f1") is not None
    (out / "sub" / "data.bin").write_bytes(b"y" * 100)
    with pytest.raises(StoreError, match="data.bin does not match its checksum"):  # a stage reading it as input
        verify_inputs({"prepare": resolve(tmp_path, "prepare", "f1")})
    (out / "sub" / "data.bin").write_bytes(b"")
    assert complete_ref(tmp_path, "prepare", "f1") is None  # so the task rebuilds it, not a cache hit
    assert not out.exists() and len(list((tmp_path / "prepare").glob("f1.damaged-*"))) == 1


def test_verify_stage_reports_each_output(tmp_path):
    good, bad = _publish(tmp_path, "good"), _publish(tmp_path, "bad")
    (bad / "vocab.json").write_text("{}   ")
    (tmp_path / "prepare" / "running").mkdir()
    rows = {path.name: (state, detail) for state, path, detail in verify_stage(tmp_path, "prepare")}
    assert rows["good"][0] == "ok" and "2 files" in rows["good"][1]
    assert rows["bad"][0] == "damaged" and "vocab.json is 5 bytes, the manifest says 2" in rows["bad"][1]
    assert rows["running"][0] == "incomplete"
    assert verify_stage(tmp_path, "pretrain") == []


def test_homer_verify_command(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("HOMER_DATA_DIR", str(tmp_path))  # --data-dir sets it for the process: restored after the test

    _publish(tmp_path, "good")
    _publish(tmp_path, "good2", stage="ingest-simpsons")
    ok = CliRunner().invoke(app, ["verify", "prepare", "ingest-simpsons", "--data-dir", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    assert [line.split()[0] for line in ok.output.splitlines()] == ["ok", "ok"]
    (tmp_path / "prepare" / "good" / "sub" / "data.bin").write_bytes(b"q" * 100)
    assert CliRunner().invoke(app, ["verify", "prepare", "--sizes-only", "--data-dir", str(tmp_path)]).exit_code == 0
    bad = CliRunner().invoke(app, ["verify", "--data-dir", str(tmp_path)])
    assert bad.exit_code == 1
    line = [x for x in bad.output.splitlines() if x.startswith("damaged")]
    assert len(line) == 1 and "prepare/good:" in line[0] and "data.bin does not match its checksum" in line[0]
    assert CliRunner().invoke(app, ["verify", "nope", "--data-dir", str(tmp_path)]).exit_code == 2


# ------------------------------------------------------------------ checkpoints


def _training_output(root, stage="finetune", fp="ft1"):
    """A finished training output: best/ (a tiny checkpoint) and a manifest listing it."""
    torch.manual_seed(0)
    vocab = build_vocab(count_chars(["hello homer"]))
    cfg = ModelConfig(embedding_dim=8, hidden_sizes=[8], dropout=0.0)
    out = root / stage / fp
    save_checkpoint(out / "best", model=build_model(cfg, vocab.size), vocab=vocab, model_config=cfg, state={"step": 1})
    write_manifest(out, manifest_for(stage, fp, {}, {}, {}))
    set_latest(root, stage, fp)
    return out


def test_truncated_checkpoint_names_the_file_and_the_stage(tmp_path):
    out = _training_output(tmp_path)
    weights = out / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(CheckpointError) as err:
        load_model_from_checkpoint(out / "best")
    assert str(weights) in str(err.value) and "the finetune output" in str(err.value)
    assert "re-run `homer stage finetune`" in str(err.value)
    bare = tmp_path / "elsewhere"  # a checkpoint outside any output: no stage remakes it
    _training_output(tmp_path, "pretrain", "pt1")
    (tmp_path / "pretrain" / "pt1" / "best").rename(bare)
    (bare / "model.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match=r"(?s)elsewhere/model.safetensors is truncated or corrupt.*no stage remakes it"):
        load_model_from_checkpoint(bare)


def test_a_damaged_finetune_latest_is_an_error_not_a_fallback(tmp_path):
    _training_output(tmp_path, "pretrain", "pt1")
    out = _training_output(tmp_path, "finetune", "ft1")
    ref, why = choose_model(tmp_path, "latest")
    assert ref.fingerprint == "ft1" and why == "finetune/latest"
    assert describe_model(ref, why) == f"{out / 'best'} (finetune/latest)"
    from flows.config import GenerateConfig
    from flows.generate import sample

    used, texts = sample(GenerateConfig(prompt="h", length=3, num_samples=1), tmp_path)  # `homer generate`'s "# ... from" line
    assert used == f"{out / 'best'} (finetune/latest)" and len(texts) == 1
    weights = out / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(StoreError, match=r"finetune/latest names ft1, but .*model.safetensors is \d+ bytes.*homer stage finetune"):
        resolve_model(tmp_path, "latest")
    weights.write_bytes(b"\x00" * 10)  # a bare path into it is checked too
    with pytest.raises(StoreError, match="model.safetensors is 10 bytes"):
        resolve_model(tmp_path, str(out / "best"))
    import shutil

    shutil.rmtree(out)
    with pytest.raises(StoreError, match="finetune/latest names ft1, but .*finetune/ft1 does not exist"):
        resolve_model(tmp_path, "latest")


# ------------------------------------------------------------------ shards


def _prepare_with_shards(root):
    vocab_fp = "v"
    with staging(root, "prepare", "p1") as tmp:
        with ShardWriter(tmp / "shards" / "simpsons", "train", seq_len=2, corpus="simpsons", vocab_fingerprint=vocab_fp,
                         rows_per_shard=2) as writer:
            writer.add(np.zeros((4, 3), dtype=np.uint16))
        write_manifest(tmp, manifest_for("prepare", "p1", {}, {}, {}))
    return root / "prepare" / "p1" / "shards" / "simpsons"


def test_deleted_and_truncated_shards_name_the_file_and_prepare(tmp_path):
    shards = _prepare_with_shards(tmp_path)
    assert len(list_shards(shards, "train")) == 2
    second = shards / "train-00001-of-00002.parquet"
    second.write_bytes(second.read_bytes()[:30])
    with pytest.raises(ShardError, match=r"(?s)train-00001-of-00002.parquet is truncated or corrupt.*the prepare output .* "
                                         r"is damaged; re-run `homer stage prepare`"):
        read_split(shards, "train")
    second.unlink()
    with pytest.raises(ShardError, match=r"incomplete .*train-00001-of-00002.parquet is missing\).*homer stage prepare"):
        list_shards(shards, "train")
    with pytest.raises(StoreError, match=r"train-00001-of-00002.parquet is missing .*homer stage prepare"):
        resolve(tmp_path, "prepare", "p1")
