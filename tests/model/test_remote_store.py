"""The object-store side of the artifact store (model/store/remote.py) against a real S3 API (moto's server)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from model.store import outputs, remote as store
from model.store.outputs import MANIFEST, StoreError

REPO = Path(__file__).resolve().parents[2]
FILES = {
    "vocab.json": b'{"chars": "abc"}',
    "shards/train-00000-of-00001.parquet": bytes(range(256)) * 40,
    "shards/empty.bin": b"",
}


def fp_() -> str:
    return uuid.uuid4().hex[:16]


def local_output(base: Path, files: dict[str, bytes] = FILES) -> Path:
    base.mkdir(parents=True)
    for rel, data in files.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(data)
    return base


def manifest(stage: str, fp: str, created: str | None = None, inputs: dict | None = None) -> dict:
    return {"stage": stage, "fingerprint": fp, "config": {"x": 1}, "inputs": inputs or {}, "counts": {},
            "metrics": {}, "created": created or datetime.now(timezone.utc).isoformat(timespec="seconds")}


def ref(stage: str, fp: str) -> dict:
    return {"stage": stage, "fingerprint": fp, "path": f"/somewhere/{stage}/{fp}"}


@pytest.fixture
def remote(s3_server, tmp_path, monkeypatch) -> store.RemoteRoot:
    """A fresh root (a prefix of its own in the session's bucket) and a fresh local cache."""
    monkeypatch.setenv("HOMER_CACHE_DIR", str(tmp_path / "cache"))
    return store.parse_root(f"s3://{s3_server.bucket}/{uuid.uuid4().hex[:8]}/data")


def publish(remote, tmp_path, stage, fp, files=FILES, created=None, inputs=None) -> dict:
    src = local_output(tmp_path / f"src-{uuid.uuid4().hex[:6]}", files)
    return store.publish_output(remote, stage, fp, src, manifest(stage, fp, created, inputs))


def test_publish_then_materialize_round_trips_into_an_empty_cache(remote, tmp_path, monkeypatch):
    fp = fp_()
    assert store.remote_output_state(remote, "prepare", fp) == "missing"
    published = publish(remote, tmp_path, "prepare", fp)
    assert store.inspect_remote_output(remote, "prepare", fp) == ("complete", [])
    assert set(published["files"]) == set(FILES) and published["dir"].startswith(store.UPLOAD_PREFIX)
    assert remote.fs.endpoint_url is None  # AWS_ENDPOINT_URL alone reached moto: botocore honours it

    mirror = store.materialize(remote, "prepare", fp)
    assert mirror == store.cache_dir(remote) / "prepare" / fp
    for rel, data in FILES.items():
        assert (mirror / rel).read_bytes() == data
    assert outputs.is_complete(mirror)
    outputs.verify_output(mirror, "prepare", checksums=True)
    assert outputs.read_manifest(mirror)["config"] == {"x": 1}

    # a second mirror of the same output: every file comes from the blob cache, nothing is downloaded
    calls = []
    real_get = remote.fs.get
    monkeypatch.setattr(remote.fs, "get", lambda *a, **k: calls.append(a) or real_get(*a, **k))
    again = store.materialize(remote, "prepare", fp, dest=tmp_path / "elsewhere" / fp)
    assert calls == [] and outputs.is_complete(again)
    outputs.verify_output(again, "prepare", checksums=True)


def test_a_second_publish_with_other_content_is_refused_and_the_same_content_accepted(remote, tmp_path):
    fp = fp_()
    first = publish(remote, tmp_path, "prepare", fp)
    assert publish(remote, tmp_path, "prepare", fp) == first  # same files: the committed output stands
    with pytest.raises(StoreError, match="committed with other files"):
        publish(remote, tmp_path, "prepare", fp, files={**FILES, "vocab.json": b'{"chars": "xyz"}'})
    assert json.loads(remote.fs.cat_file(remote.path("prepare", fp, MANIFEST)))["dir"] == first["dir"]


@pytest.mark.parametrize("same", [True, False])
def test_a_writer_that_loses_the_race_for_the_manifest(remote, tmp_path, monkeypatch, same):
    """Both writers saw no manifest; the second's create-only write finds the first's."""
    fp = fp_()
    first = publish(remote, tmp_path, "prepare", fp)
    real = store._inspect
    calls = []
    monkeypatch.setattr(store, "_inspect", lambda *a: real(*a) if calls.append(a) or len(calls) > 1
                        else store._Found("missing", [], None, {}))
    files = FILES if same else {**FILES, "vocab.json": b'{"chars": "xyz"}'}
    if same:
        assert publish(remote, tmp_path, "prepare", fp, files=files)["dir"] == first["dir"]
    else:
        with pytest.raises(StoreError, match="committed with other files"):
            publish(remote, tmp_path, "prepare", fp, files=files)
    uploads = [n for n in store.child_names(remote, remote.path("prepare", fp)) if n.startswith(store.UPLOAD_PREFIX)]
    assert uploads == [first["dir"]]  # the loser removed its upload; the winner's files are untouched
    assert store.remote_output_state(remote, "prepare", fp) == "complete"
    outputs.verify_output(store.materialize(remote, "prepare", fp), checksums=True)


def test_files_without_a_manifest_are_incomplete_never_materialized_and_collected(remote, tmp_path):
    fp = fp_()
    store.upload_files(remote, "prepare", fp, local_output(tmp_path / "src"))  # a writer killed before its manifest
    state, problems = store.inspect_remote_output(remote, "prepare", fp)
    assert state == "incomplete" and MANIFEST in problems[0]
    with pytest.raises(StoreError, match="not a complete 'prepare' output"):
        store.materialize(remote, "prepare", fp)
    assert not (store.cache_dir(remote) / "prepare" / fp).exists()

    url = remote.url_of(remote.path("prepare", fp))
    young = dict(store.gc(remote, remove=True))  # default grace: maybe a writer at work
    assert young[url].startswith("in progress?")
    assert store.remote_output_state(remote, "prepare", fp) == "incomplete"
    rows = dict(store.gc(remote.url, grace_s=0))
    assert rows[url].startswith("incomplete")
    assert store.remote_output_state(remote, "prepare", fp) == "incomplete"  # listing removes nothing
    store.gc(remote.url, remove=True, grace_s=0)
    assert store.remote_output_state(remote, "prepare", fp) == "missing"


def test_a_writer_killed_between_its_files_and_its_manifest(remote, tmp_path):
    fp = fp_()
    src = local_output(tmp_path / "src")
    script = textwrap.dedent(f"""
        import sys, time
        from model.store import remote as store
        def stall(*args):
            print("files uploaded", flush=True)
            time.sleep(60)
        store._create_only = stall
        root = store.parse_root({remote.url!r})
        store.publish_output(root, "prepare", {fp!r}, {str(src)!r}, {{"stage": "prepare", "fingerprint": {fp!r}}})
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert child.stdout.readline().strip() == "files uploaded"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert store.remote_output_state(remote, "prepare", fp) == "incomplete"
    with pytest.raises(StoreError, match="never finished, or is still being written"):
        store.materialize(remote, "prepare", fp)
    # the stage runs again and commits: the killed writer's files become an abandoned upload
    publish(remote, tmp_path, "prepare", fp)
    store.advance_latest(remote, "prepare", fp)
    rows = store.gc(remote, grace_s=0)
    assert [reason.split(":")[0] for _, reason in rows] == ["abandoned upload"]
    store.gc(remote, remove=True, grace_s=0)
    assert store.gc(remote, grace_s=0) == [] and store.remote_output_state(remote, "prepare", fp) == "complete"


def test_latest_never_goes_backwards(remote, tmp_path):
    old, new = fp_(), fp_()
    t0 = datetime(2026, 12, 1, 8, 0, tzinfo=timezone.utc)
    publish(remote, tmp_path, "prepare", old, created=t0.isoformat())
    publish(remote, tmp_path, "prepare", new, created=(t0 + timedelta(hours=1)).isoformat())
    assert store.read_latest(remote, "prepare") is None
    name = store.advance_latest(remote, "prepare", new)
    assert name == f"20261201T090000000000Z-{new}" and len(name.split("-")[0]) == 22
    store.advance_latest(remote, "prepare", old)  # a stale writer, with its older time, comes late
    assert store.read_latest(remote, "prepare") == new
    store.advance_latest(remote, "prepare", new)  # the same record again: fine
    # an explicit newer time does move it, and a naive time counts as UTC
    store.advance_latest(remote, "prepare", old, created=datetime(2026, 12, 1, 10, 0))
    assert store.read_latest(remote, "prepare") == old
    assert store.latest_name("2026-12-01T11:00:00+01:00", old) == f"20261201T100000000000Z-{old}"


def test_read_latest_skips_an_entry_whose_output_is_not_complete(remote, tmp_path):
    good, bad = fp_(), fp_()
    publish(remote, tmp_path, "prepare", good, created="2026-12-01T08:00:00+00:00")
    store.advance_latest(remote, "prepare", good)
    store.upload_files(remote, "prepare", bad, local_output(tmp_path / "bad"))
    with pytest.raises(StoreError, match="only a complete output can become latest"):
        store.advance_latest(remote, "prepare", bad, created="2026-12-02T08:00:00+00:00")
    # entries naming an incomplete and a missing output, both newer than the good one
    remote.fs.pipe_file(remote.path("prepare", store.LATEST_LOG, store.latest_name("2026-12-02T08:00:00", bad)), b"")
    remote.fs.pipe_file(remote.path("prepare", store.LATEST_LOG, store.latest_name("2026-12-03T08:00:00", fp_())), b"")
    assert store.read_latest(remote, "prepare") == good


def test_a_corrupted_file_on_the_server_is_refused_naming_it(remote, tmp_path):
    fp = fp_()
    published = publish(remote, tmp_path, "prepare", fp)
    key = remote.path("prepare", fp, published["dir"], "shards/train-00000-of-00001.parquet")
    data = bytearray(remote.fs.cat_file(key))
    data[100] ^= 0xFF  # same size: only the checksum can tell
    remote.fs.pipe_file(key, bytes(data))
    assert store.remote_output_state(remote, "prepare", fp) == "complete"
    with pytest.raises(store.DamagedOutputError) as caught:
        store.materialize(remote, "prepare", fp)
    message = str(caught.value)
    assert remote.url_of(key) in message and "does not match its checksum" in message
    assert "homer stage prepare" in message and caught.value.stage == "prepare"
    assert not (store.cache_dir(remote) / "prepare" / fp).exists()
    assert not list((store.cache_dir(remote) / store.BLOBS).rglob(published["files"]["shards/train-00000-of-00001.parquet"]["xxh3_128"]))

    remote.fs.pipe_file(key, b"short")  # another size: damaged by the listing alone
    state, problems = store.inspect_remote_output(remote, "prepare", fp)
    assert state == "damaged" and remote.url_of(key) in problems[0]
    # the stage re-runs: the damaged output is set aside and replaced
    publish(remote, tmp_path, "prepare", fp)
    assert store.remote_output_state(remote, "prepare", fp) == "complete"
    outputs.verify_output(store.materialize(remote, "prepare", fp), checksums=True)
    assert any(store.DAMAGED in n for n in store.child_names(remote, remote.path("prepare")))


def test_checkpoints_push_and_pull(remote, tmp_path):
    fp = fp_()
    assert store.pull_checkpoint(remote, "pretrain", fp, "last", tmp_path / "none") is None
    ckpt = local_output(tmp_path / "ckpt", {"model.safetensors": b"w" * 3000, "state.json": b'{"step": 10}'})
    store.push_checkpoint(remote, "pretrain", fp, "last", ckpt, 10)
    (ckpt / "model.safetensors").write_bytes(b"v" * 3100)
    (ckpt / "state.json").write_bytes(b'{"step": 20}')
    pointer = store.push_checkpoint(remote, "pretrain", fp, "last", ckpt, 20)
    assert pointer["step"] == 20 and pointer["dir"].startswith("last.d/00000020-")
    assert store.child_names(remote, remote.path("pretrain", fp, "last.d")) == [pointer["dir"].split("/")[1]]
    assert store.remote_output_state(remote, "pretrain", fp) == "incomplete"  # a training in progress

    pulled = store.pull_checkpoint(remote, "pretrain", fp, "last", tmp_path / "fresh")
    assert pulled == tmp_path / "fresh" / "last"
    assert (pulled / "model.safetensors").read_bytes() == b"v" * 3100
    assert (pulled / "state.json").read_bytes() == b'{"step": 20}'
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == ["last"]

    remote.fs.rm_file(remote.path("pretrain", fp, pointer["dir"], "state.json"))
    with pytest.raises(StoreError, match="state.json is missing") as caught:
        store.pull_checkpoint(remote, "pretrain", fp, "last", tmp_path / "fresh")
    assert remote.url_of(remote.path("pretrain", fp, "last.json")) in str(caught.value)
    assert (pulled / "state.json").read_bytes() == b'{"step": 20}'  # the previous pull is untouched


def _age(path: Path, hours: float = 2) -> None:
    when = datetime.now().timestamp() - hours * 3600
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (when, when), follow_symlinks=False)


def _local(root: Path, stage: str, fp: str, inputs: dict | None = None) -> Path:
    with outputs.staging(root, stage, fp) as tmp:
        (tmp / "data.bin").write_bytes(b"x" * 10)
        outputs.write_manifest(tmp, manifest(stage, fp, inputs=inputs))
    return root / stage / fp


def test_gc_on_a_local_root(tmp_path):
    root = tmp_path / "data"
    (root / "sample").mkdir(parents=True)
    (root / "sample" / "README.md").write_text("shipped with the project")
    a, b, c, p = fp_(), fp_(), fp_(), fp_()
    _local(root, "prepare", a)
    _local(root, "prepare", b)
    _local(root, "prepare", c)  # prepare's latest
    _local(root, "pretrain", p, inputs={"data": ref("prepare", a)})  # pretrain's latest: reaches prepare a
    damaged = root / "prepare" / f"{fp_()}{outputs.DAMAGED}20261201T000000Z"
    damaged.mkdir()
    leftover = root / "prepare" / f".{fp_()}.tmp-123-abcdef12"
    leftover.mkdir()
    (leftover / "half.bin").write_bytes(b"1")
    incomplete = root / "pretrain" / fp_()
    incomplete.mkdir()
    (incomplete / "last").mkdir()

    young = dict(store.gc(root, remove=True))  # just written: only what was set aside goes
    assert young[str(incomplete)].startswith("in progress?") and young[str(leftover)].startswith("in progress?")
    assert "kept" in young[str(root / "prepare" / b)] and (root / "prepare" / b).is_dir()
    assert young[str(damaged)].startswith("damaged") and not damaged.exists()
    assert incomplete.is_dir() and leftover.is_dir()
    damaged.mkdir()

    _age(root)
    rows = dict(store.gc(str(root)))
    assert {path: reason.split(":")[0] for path, reason in rows.items()} == {
        str(damaged): "damaged", str(leftover): "staging leftover", str(incomplete): "incomplete",
        str(root / "prepare" / b): "unreachable (complete)"}
    assert store.gc(f"file://{root}") == list(rows.items())

    # a writer holding the output's lock is at work, however old its files: it and the unreachable stay
    with outputs.exclusive(root, "pretrain", incomplete.name):
        held = dict(store.gc(root, remove=True))
    assert held[str(incomplete)].startswith("in progress?") and "writer is at work" in held[str(root / "prepare" / b)]
    assert incomplete.is_dir() and (root / "prepare" / b).is_dir()

    (root / "pretrain" / f".{incomplete.name}.lock").unlink()
    _age(root)
    store.gc(root, remove=True)
    assert not damaged.exists() and not leftover.exists() and not incomplete.exists()
    assert not (root / "prepare" / b).exists()
    for stage, fp in (("prepare", a), ("prepare", c), ("pretrain", p)):
        assert outputs.is_complete(root / stage / fp)
    assert outputs.latest(root, "prepare").fingerprint == c
    assert (root / "sample" / "README.md").is_file()
    assert store.gc(root) == []


def test_gc_on_a_remote_root_keeps_what_latest_reaches(remote, tmp_path):
    a, b, old, p, gone = fp_(), fp_(), fp_(), fp_(), fp_()
    publish(remote, tmp_path, "prepare", old, created="2026-12-01T07:00:00+00:00")
    publish(remote, tmp_path, "prepare", a, created="2026-12-01T08:00:00+00:00")
    publish(remote, tmp_path, "prepare", b, created="2026-12-01T09:00:00+00:00")
    publish(remote, tmp_path, "pretrain", p, inputs={"data": ref("prepare", a)})
    for fp in (old, a, b):
        store.advance_latest(remote, "prepare", fp)
    store.advance_latest(remote, "pretrain", p)
    store.push_checkpoint(remote, "pretrain", p, "last", local_output(tmp_path / "ck", {"m": b"1"}), 5)
    store.upload_files(remote, "prepare", gone, local_output(tmp_path / "g"))
    remote.fs.pipe_file(remote.path("prepare", store.LATEST_LOG, store.latest_name("2026-12-01T06:00:00", gone)), b"")
    aside = remote.path("prepare", f"{fp_()}{store.DAMAGED}20261201T000000Z-abc123")
    remote.fs.pipe_file(f"{aside}/{MANIFEST}", b"{}")

    rows = store.gc(remote, grace_s=0)
    kinds = {url: reason.split(":")[0] for url, reason in rows}
    url = lambda *parts: remote.url_of(remote.path(*parts))
    assert kinds == {
        url("prepare", gone): "incomplete",
        url("prepare", old): "unreachable (complete)",
        url("pretrain", p, "last.d"): "finished checkpoint",
        url("pretrain", p, "last.json"): "finished checkpoint",
        remote.url_of(aside): "damaged",
        url("prepare", store.LATEST_LOG, store.latest_name("2026-12-01T07:00:00+00:00", old)): "stale latest entry",
        url("prepare", store.LATEST_LOG, store.latest_name("2026-12-01T06:00:00", gone)): "stale latest entry",
    }
    assert {url for url, _ in store.gc(remote, grace_s=0)} == set(kinds)  # listing changed nothing

    store.gc(remote, remove=True, grace_s=0)
    for stage, fp in (("prepare", a), ("prepare", b), ("pretrain", p)):
        assert store.remote_output_state(remote, stage, fp) == "complete"
    assert store.remote_output_state(remote, "prepare", old) == "missing"
    assert store.remote_output_state(remote, "prepare", gone) == "missing"
    assert store.read_latest(remote, "prepare") == b and store.read_latest(remote, "pretrain") == p
    assert store.pull_checkpoint(remote, "pretrain", p, "last", tmp_path / "x") is None
    assert store.gc(remote, grace_s=0) == []


def test_secrets_never_appear_in_messages_or_logs(remote, s3_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    messages = [repr(remote), str(store.cache_dir(remote))]
    fp = fp_()
    publish(remote, tmp_path, "prepare", fp)
    store.advance_latest(remote, "prepare", fp)
    store.materialize(remote, "prepare", fp)
    store.gc(remote)
    failing = [
        lambda: publish(remote, tmp_path, "prepare", fp, files={"other": b"1"}),
        lambda: store.materialize(remote, "prepare", fp_()),
        lambda: store.publish_output(store.parse_root("s3://no-such-bucket-here/x"), "prepare", fp,
                                     local_output(tmp_path / "nb"), manifest("prepare", fp)),
        lambda: store.parse_root(f"s3://homer-fake-key-id:{s3_server.secret}@{s3_server.bucket}/x"),
    ]
    for call in failing:
        with pytest.raises(StoreError) as caught:
            call()
        messages.append(str(caught.value))
    assert "bucket" in messages[-2]
    assert caplog.records, "the operations log something"
    for text in [*messages, caplog.text]:
        assert s3_server.secret not in text


def test_roots_urls_and_the_cache(tmp_path, monkeypatch, s3_server):
    for url in ("s3://AKIAFAKE:topsecret@bucket/x", "s3://AKIAFAKE@bucket/x"):
        with pytest.raises(StoreError, match="credentials in it") as caught:
            store.parse_root(url)
        assert "topsecret" not in str(caught.value) and "AKIAFAKE" not in str(caught.value)
    with pytest.raises(StoreError, match="query string") as caught:
        store.parse_root("s3://bucket/x?X-Amz-Signature=topsecret")
    assert "topsecret" not in str(caught.value)
    with pytest.raises(StoreError, match="unsupported scheme"):
        store.parse_root("ftp://host/x")
    with pytest.raises(StoreError, match="names no bucket"):
        store.parse_root("s3:///x")
    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(StoreError, match=r"pip install 'recurrent-homer\[gcs\]'"):
            store.parse_root("gs://bucket/x")

    assert store.parse_root(str(tmp_path)) is None and store.parse_root(tmp_path) is None
    assert store.parse_root(f"file://{tmp_path}/data") is None
    assert store.local_path(f"file://{tmp_path}/data") == tmp_path / "data"
    assert store.cache_dir(tmp_path / "data") == tmp_path / "data"
    assert isinstance(store.open_root(f"s3://{s3_server.bucket}/p"), store.RemoteRoot)

    monkeypatch.setenv("HOMER_CACHE_DIR", str(tmp_path / "cache"))
    one = store.cache_dir(f"s3://{s3_server.bucket}/a/")
    assert one == store.cache_dir(f"s3://{s3_server.bucket}/a") == store.cache_dir(f"s3a://{s3_server.bucket}/a")
    assert one.parent == tmp_path / "cache" and one.name.startswith(f"s3-{s3_server.bucket}-a-")
    assert store.cache_dir(f"s3://{s3_server.bucket}/b") != one
    monkeypatch.delenv("HOMER_CACHE_DIR")
    assert store.cache_dir(f"s3://{s3_server.bucket}/a").parent == Path.home() / ".cache" / "recurrent-homer"


def test_a_store_call_that_gets_no_answer_in_time_fails_naming_the_limit(s3_server, tmp_path, monkeypatch):
    """A link that goes down mid-upload must fail the stage, not hang it: every store call has a time limit."""
    monkeypatch.setenv(store.STORE_TIMEOUT_ENV, "0.000001")  # no call answers that fast
    remote = store.parse_root(f"s3://{s3_server.bucket}/{uuid.uuid4().hex[:8]}/data")
    with pytest.raises(StoreError, match=r"no answer within 1e-06 s .*HOMER_STORE_TIMEOUT_S.*check the store's address"):
        publish(remote, tmp_path, "prepare", "a" * outputs.FINGERPRINT_CHARS)
    monkeypatch.setenv(store.STORE_TIMEOUT_ENV, "soon")
    with pytest.raises(StoreError, match="HOMER_STORE_TIMEOUT_S='soon': expected seconds above 0"):
        store.parse_root(f"s3://{s3_server.bucket}/x")


def test_a_root_reaches_the_endpoint_named_when_it_is_opened(s3_server, tmp_path, monkeypatch):
    """fsspec caches filesystems by their arguments alone: a root opened after AWS_ENDPOINT_URL changed must not be
    handed the filesystem bound to the earlier endpoint (in CI, the cluster tests' bucket answered NoSuchBucket here)."""
    import socket

    monkeypatch.setenv("HOMER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(store.STORE_TIMEOUT_ENV, "2")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nobody = probe.getsockname()[1]  # closed when the block ends: nothing listens there
    url = f"s3://{s3_server.bucket}/{uuid.uuid4().hex[:8]}/data"
    fp = fp_()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{nobody}")
    with pytest.raises(StoreError, match="no answer within 2 s|could not connect"):
        store.remote_output_state(store.parse_root(url), "prepare", fp)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    here = store.parse_root(url)
    assert store.remote_output_state(here, "prepare", fp) == "missing"
    publish(here, tmp_path, "prepare", fp)
    assert store.remote_output_state(store.parse_root(url), "prepare", fp) == "complete"
