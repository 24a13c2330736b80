"""The artifact store: fingerprints, staging, latest, resolve, unwritable roots."""

from __future__ import annotations

import os

import pytest

from model.store.outputs import (
    StageRef,
    StoreError,
    check_writable,
    fingerprint,
    is_complete,
    latest,
    manifest_for,
    resolve,
    staging,
    write_manifest,
)


def _publish(root, fp, body="x"):
    with staging(root, "prepare", fp) as tmp:
        (tmp / "file.txt").write_text(body)
        write_manifest(tmp, manifest_for("prepare", fp, {"a": 1}, {}, {"n": 1}))


def test_fingerprint_changes_with_config_inputs_and_code():
    base = fingerprint("prepare", {"seq_len": 100}, {"w": "abc"}, "1")
    assert base == fingerprint("prepare", {"seq_len": 100}, {"w": "abc"}, "1")
    assert len({base, fingerprint("prepare", {"seq_len": 50}, {"w": "abc"}, "1"),
                fingerprint("prepare", {"seq_len": 100}, {"w": "abd"}, "1"),
                fingerprint("prepare", {"seq_len": 100}, {"w": "abc"}, "2")}) == 4


def test_staging_publishes_manifest_and_latest(tmp_path):
    _publish(tmp_path, "f1")
    ref = latest(tmp_path, "prepare")
    assert ref.fingerprint == "f1" and (ref.dir / "file.txt").read_text() == "x"
    manifest = ref.manifest()
    assert manifest["stage"] == "prepare" and manifest["counts"] == {"n": 1} and "torch" in manifest["versions"]
    assert sorted(p.name for p in (tmp_path / "prepare").iterdir()) == ["f1", "latest"]


def test_failure_leaves_nothing_that_looks_complete(tmp_path):
    with pytest.raises(RuntimeError):
        with staging(tmp_path, "prepare", "f2") as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("crash")
    assert not (tmp_path / "prepare" / "f2").exists()
    assert [p for p in (tmp_path / "prepare").iterdir()] == []
    with pytest.raises(StoreError, match="homer stage prepare"):
        latest(tmp_path, "prepare")


def test_output_without_manifest_is_not_published(tmp_path):
    with pytest.raises(StoreError, match="manifest"):
        with staging(tmp_path, "prepare", "f3") as tmp:
            (tmp / "data").write_text("no manifest")
    assert not is_complete(tmp_path / "prepare" / "f3")


def test_second_writer_of_the_same_fingerprint_keeps_the_first(tmp_path):
    _publish(tmp_path, "f4", body="first")
    _publish(tmp_path, "f4", body="second")
    assert (tmp_path / "prepare" / "f4" / "file.txt").read_text() == "first"
    assert not [p for p in (tmp_path / "prepare").iterdir() if p.name.startswith(".")]


def test_resolve_by_fingerprint_path_and_latest(tmp_path):
    _publish(tmp_path, "f5")
    by_fp = resolve(tmp_path, "prepare", "f5")
    assert by_fp == resolve(tmp_path, "prepare", None) == resolve(tmp_path, "prepare", str(tmp_path / "prepare" / "f5"))
    assert resolve(tmp_path, "prepare", by_fp.model_dump()) == by_fp
    with pytest.raises(StoreError, match="neither"):
        resolve(tmp_path, "prepare", "nope")
    with pytest.raises(StoreError, match="'prepare' output"):
        resolve(tmp_path, "pretrain", StageRef(stage="prepare", fingerprint="f5", path=by_fp.path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_root_names_the_setting(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(StoreError, match="HOMER_DATA_DIR"):
        check_writable(locked / "data")


def test_root_that_is_a_file_names_the_setting(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="not writable.*HOMER_DATA_DIR"):
        check_writable(blocker / "data")


def test_a_foreign_directory_in_the_way_is_reported_not_deleted(tmp_path):
    foreign = tmp_path / "prepare" / "f6"
    foreign.mkdir(parents=True)
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a complete output"):
        _publish(tmp_path, "f6")
    assert (foreign / "precious.txt").read_text() == "keep me"
    assert not [p for p in (tmp_path / "prepare").iterdir() if p.name.startswith(".")]
