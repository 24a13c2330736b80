"""The object-store side of the artifact store: stage outputs in s3://, gs:// or az:// roots.

When the artifact root (`HOMER_DATA_DIR`) is a URL, the stages still work on local Paths:
the local side is a cache directory (`cache_dir`), and this module moves whole outputs
between that cache and the store. A plain path or a `file://` URL is a local root and
does not touch this module (`parse_root` returns None; `local_path` gives the Path).

Layout under the root URL (the local layout plus what an object store cannot do by rename):

    <root>/<stage>/<fp>/manifest.json                   written last, create-only: the commit
    <root>/<stage>/<fp>/upload-<time>-<id>/<files>      one folder per writer; the manifest's `dir`
    <root>/<stage>/<fp>/<kind>.json                     checkpoint pointer of a training in progress
    <root>/<stage>/<fp>/<kind>.d/<step:08d>-<id>/...    the checkpoint files that pointer names
    <root>/<stage>/<fp>.damaged-<time>/manifest.json    a damaged output's manifest, set aside
    <root>/<stage>/latest.d/<created>-<fp>              empty objects: the `latest` log

Commit protocol (no rename on an object store, so the manifest is the commit):

1. A writer uploads every file of its finished local output into a folder of its own,
   `<fp>/upload-<time>-<id>/`, and checks that they all arrived at their sizes.
2. It writes `<fp>/manifest.json` (stage, fingerprint, config, inputs, ..., `files`: every
   file's size and xxh3_128 checksum, and `dir`: its upload folder) LAST and CREATE-ONLY:
   `fs.pipe_file(path, data, mode="create")`, which s3fs sends as a PUT with
   `If-None-Match: *` (gcsfs: `ifGenerationMatch=0`, adlfs: `overwrite=False`); all three
   raise FileExistsError when the object exists. Exactly one writer's manifest wins.
3. A loser whose files have the same checksums is fine (same fingerprint, same content):
   it deletes its upload folder and uses the winner's. A loser with other content gets a
   StoreError (two runs of one output at once; the lease per output should prevent that).
   Because each writer has its own folder and a manifest names exactly one, a loser can
   never overwrite the files of a committed output, even when its bytes differ (training).

An output is complete when its manifest parses and every file it lists exists, in the
manifest's `dir`, at its recorded size (`remote_output_state`). Nothing reads an output
without a manifest: a writer killed between its files and its manifest leaves an
`incomplete` folder that is never materialized and that `gc` removes after a grace period.

`latest` without compare-and-swap: `advance_latest` writes an empty, create-only object
`<stage>/latest.d/<created:%Y%m%dT%H%M%S%fZ>-<fp>` (UTC, 22 characters, one width
everywhere) and `read_latest` lists `latest.d/` and takes the greatest name whose output is
complete. A slow or stale writer with an older `created` time only adds a smaller name, so
latest never goes backwards, and no writer ever overwrites another's object. S3 does offer
`If-Match` on an ETag, but not every store (or every S3 clone) does, and a log of
create-only names needs no retry loop; so the log is the choice here. Latest is "the newest
complete output by creation time" (ties: the greater fingerprint).

Reading: `materialize` downloads a complete output into the local cache, content-addressed:
each file goes to `<cache>/.blobs/<algorithm>/<checksum>` once (its size and checksum are
checked; a mismatch is a DamagedOutputError naming the remote file and the stage that remakes
it), then is hard-linked (or copied) into `<cache>/<stage>/<fp>/`, and the manifest is
written there last; the mirror is a complete local output for `outputs.is_complete` and
`outputs.verify_output(checksums=True)`.

Training checkpoints: `push_checkpoint` uploads a checkpoint folder, then overwrites the
pointer `<fp>/<kind>.json` (one PUT is atomic), then deletes the older step folders;
`pull_checkpoint` reads the pointer and downloads what it names, verified.

`gc` lists (and with remove=True deletes) what no one needs, on a remote or a local root.

Credentials come the standard way (AWS_* variables, including AWS_ENDPOINT_URL, which
botocore itself honours; profiles; GOOGLE_APPLICATION_CREDENTIALS; AZURE_STORAGE_*). They never
appear in a URL (refused), a message, a log line or a repr of this module.

    remote = parse_root("s3://bucket/homer")          # None for a local root
    out = publish_output(remote, "prepare", fp, local_dir, manifest)   # files, then manifest
    advance_latest(remote, "prepare", fp)
    fp = read_latest(remote, "prepare")
    path = materialize(remote, "prepare", fp)          # <cache>/prepare/<fp>, a complete local output
    gc("s3://bucket/homer", remove=False)              # [(url, reason), ...]

May import: the standard library, fsspec, and model.store.outputs. The object-store
libraries (s3fs, gcsfs, adlfs) are optional extras, loaded through fsspec on use.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import unquote, urlsplit

import fsspec

from model.store import outputs
from model.store.outputs import CHECKSUM, DAMAGED, FINGERPRINT_CHARS, LATEST, MANIFEST, StoreError, list_files, remake_hint

log = logging.getLogger(__name__)

LATEST_LOG = "latest.d"  # <stage>/latest.d/<created>-<fp>: the create-only latest log
UPLOAD_PREFIX = "upload-"  # <fp>/upload-<time>-<id>/: one writer's files
BLOBS = ".blobs"  # <cache>/.blobs/<algorithm>/<checksum>: downloaded files, content-addressed
GRACE_S = 3600.0  # gc: an incomplete output written to within this many seconds may be a writer at work
LATEST_STAMP = "%Y%m%dT%H%M%S%fZ"  # 20261202T102631000000Z: 22 characters, sorts as time does

_SCHEMES = {  # URL scheme -> (fsspec protocol, package, extra of recurrent-homer)
    "s3": ("s3", "s3fs", "s3"),
    "s3a": ("s3", "s3fs", "s3"),
    "gs": ("gcs", "gcsfs", "gcs"),
    "gcs": ("gcs", "gcsfs", "gcs"),
    "az": ("az", "adlfs", "azure"),
    "abfs": ("abfs", "adlfs", "azure"),
    "abfss": ("abfs", "adlfs", "azure"),
}
_AZURE = {"az", "abfs", "abfss"}  # `abfs://container@account.dfs.core.windows.net/...` is a name, not a login
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AZURE_STORAGE_KEY",
               "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN",
               "AZURE_CLIENT_SECRET", "GOOGLE_OAUTH_ACCESS_TOKEN")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # a stage, a fingerprint, a checkpoint kind
FINGERPRINT_RE = re.compile(rf"^[0-9a-f]{{{FINGERPRINT_CHARS}}}$")  # what gc recognises as an output folder
_LATEST_ENTRY = re.compile(r"^(\d{8}T\d{12}Z)-([A-Za-z0-9_][A-Za-z0-9_.-]*)$")
_PROGRAMMING_ERRORS = (TypeError, AttributeError, NameError, AssertionError, NotImplementedError)


class DamagedOutputError(StoreError):
    """A remote output whose files do not match its manifest; `set_aside_remote` lets its stage rebuild it."""

    def __init__(self, message: str, url: str, stage: str, fingerprint: str):
        super().__init__(message)
        self.url, self.stage, self.fingerprint = url, stage, fingerprint


@dataclass(frozen=True)
class RemoteRoot:
    """An artifact root in an object store. `fs` is the fsspec filesystem (never printed)."""

    url: str  # scheme://bucket/prefix, no trailing slash, never with credentials
    scheme: str  # as written: s3, gs, az, ...
    protocol: str  # fsspec's: s3, gcs, az, abfs
    base: str  # bucket/prefix: the root as an fsspec path
    fs: Any = field(repr=False, compare=False, hash=False)

    def path(self, *parts: str) -> str:
        """The fsspec path of `<root>/<parts...>`."""
        return "/".join([self.base, *(p.strip("/") for p in parts if p)])

    def url_of(self, path: str) -> str:
        """scheme://path for an fsspec path: what messages show."""
        return f"{self.scheme}://{path.strip('/')}"


@dataclass
class _Found:
    """What one look at `<root>/<stage>/<fp>/` found: the manifest is read before the listing."""

    state: str  # complete, incomplete, damaged, missing
    problems: list[str]
    manifest: dict | None
    listing: dict[str, dict]  # fsspec path -> info, for everything under the output folder


# ---------------------------------------------------------------------------- roots

def parse_root(root: str | os.PathLike | RemoteRoot | None) -> RemoteRoot | None:
    """A RemoteRoot for an s3://, gs:// or az:// URL; None for a local path or a file:// URL.

    Refuses (StoreError) a URL with credentials, a query string or an unknown scheme, and
    names the extra to install when the store's library is missing.
    """
    if isinstance(root, RemoteRoot):
        return root
    if root is None or isinstance(root, os.PathLike):
        return None
    text = str(root).strip()
    match = _URL.match(text)
    if not match:
        return None
    scheme = match.group(1).lower()
    if scheme == "file":
        return None
    if scheme not in _SCHEMES:
        raise StoreError(f"the artifact root {_redacted(text)} has an unsupported scheme '{scheme}://'; "
                         f"use a local path, file://, s3://, gs:// or az://")
    parts = urlsplit(text)
    if parts.query or parts.fragment:
        raise StoreError(f"the artifact root {_redacted(text)} carries a query string or fragment, which may "
                         f"hold a token; give the bare URL and set credentials the standard way "
                         f"(environment variables or a profile)")
    if parts.password is not None or ("@" in parts.netloc and scheme not in _AZURE):
        raise StoreError(f"the artifact root {_redacted(text)} has credentials in it; remove them from the URL "
                         f"and set them the standard way (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                         f"GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_* or a profile)")
    bucket = parts.netloc
    segments = [s for s in parts.path.split("/") if s]
    if not bucket or any(s in (".", "..") for s in segments):
        raise StoreError(f"the artifact root {_redacted(text)} names no bucket, or has '.' or '..' in its path; "
                         f"write it as {scheme}://bucket/prefix")
    base = "/".join([bucket, *segments])
    protocol, package, extra = _SCHEMES[scheme]
    url = f"{scheme}://{base}"
    return RemoteRoot(url=url, scheme=scheme, protocol=protocol, base=base, fs=_filesystem(protocol, package, extra, url))


# A time limit on every call to an object store: a link that goes down in the middle of an upload otherwise
# hangs it (the store libraries set no limit on sending; the kernel gives up after about 15 minutes), and the
# stage neither fails nor finishes. Generous by default: a call is a whole folder's upload or download.
STORE_TIMEOUT_ENV = "HOMER_STORE_TIMEOUT_S"
DEFAULT_STORE_TIMEOUT_S = 600.0
_TIMED_CALLS = frozenset({"cat_file", "exists", "find", "get", "get_file", "info", "ls", "pipe", "pipe_file", "put",
                          "put_file", "rm", "rm_file"})


def store_timeout_s() -> float:
    """HOMER_STORE_TIMEOUT_S (seconds, above 0), else the default; a bad value is a StoreError naming it."""
    text = os.environ.get(STORE_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_STORE_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (0 < value < float("inf")):
        raise StoreError(f"{STORE_TIMEOUT_ENV}={text!r}: expected seconds above 0 (the time limit on each call to the "
                         f"artifact store; default {DEFAULT_STORE_TIMEOUT_S:g})")
    return value


class TimedFileSystem:
    """An async fsspec filesystem whose calls in _TIMED_CALLS fail with fsspec's FSTimeoutError after `seconds`.

    fsspec's blocking wrappers take a `timeout` and cancel the call when it runs out; everything else
    passes through unchanged.
    """

    def __init__(self, fs: Any, seconds: float):
        self._fs, self._seconds = fs, seconds

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._fs, name)
        if name in _TIMED_CALLS and callable(attr):
            def timed(*args, **kwargs):
                kwargs.setdefault("timeout", self._seconds)
                return attr(*args, **kwargs)
            return timed
        return attr


# What a store library reads from the environment (endpoint, credentials, region, project): the key of _FILESYSTEMS.
_STORE_ENV_PREFIXES = ("AWS_", "AZURE_", "GOOGLE_", "GCS_", "GCSFS_", "S3FS_", "FSSPEC_")
_FILESYSTEMS: dict[tuple, Any] = {}


def _store_environment() -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_STORE_ENV_PREFIXES)))


def _filesystem(protocol: str, package: str, extra: str, url: str) -> Any:
    try:
        # fsspec's own instance cache is keyed on the arguments only: an instance made while AWS_ENDPOINT_URL named
        # one server would be handed back after it names another (a test, a Dask worker, a notebook that switches
        # roots). So instances are cached here, keyed on the process and the store variables of the environment.
        key = (protocol, os.getpid(), store_timeout_s(), _store_environment())
        if key not in _FILESYSTEMS:
            # No listings cache: other machines write to the same root, a cached listing would hide their work.
            fs = fsspec.filesystem(protocol, use_listings_cache=False, skip_instance_cache=True)
            from fsspec.asyn import AsyncFileSystem

            _FILESYSTEMS[key] = TimedFileSystem(fs, key[2]) if isinstance(fs, AsyncFileSystem) else fs
        return _FILESYSTEMS[key]
    except ImportError:
        raise StoreError(f"the artifact root {url} needs the {package} package, which is not installed: "
                         f"pip install 'recurrent-homer[{extra}]'") from None
    except Exception as exc:
        if isinstance(exc, _PROGRAMMING_ERRORS):
            raise
        raise StoreError(f"cannot open the artifact root {url}: {_describe(exc)}; {_hint(exc)}") from exc


def is_remote(root: str | os.PathLike | RemoteRoot | None) -> bool:
    """True for an s3://, gs:// or az:// root (without opening it)."""
    if isinstance(root, RemoteRoot):
        return True
    if root is None or isinstance(root, os.PathLike):
        return False
    match = _URL.match(str(root).strip())
    return bool(match) and match.group(1).lower() != "file"


def local_path(root: str | os.PathLike | None = None) -> Path:
    """The Path of a local root: a path or a file:// URL (None: $HOMER_DATA_DIR, else ./data)."""
    if root is None:
        return outputs.data_root()
    if isinstance(root, RemoteRoot) or is_remote(root):
        raise StoreError(f"{root.url if isinstance(root, RemoteRoot) else _redacted(str(root))} is not a local "
                         f"root; its local side is cache_dir(root)")
    text = str(root)
    if _URL.match(text.strip()):  # file://
        parts = urlsplit(text.strip())
        if parts.netloc not in ("", "localhost"):
            raise StoreError(f"{_redacted(text)} names another host; a file:// root is file:///absolute/path")
        return Path(unquote(parts.path)).absolute()
    return Path(text).absolute()


def open_root(root: str | os.PathLike | None = None) -> RemoteRoot | Path:
    """The artifact root (the argument, else $HOMER_DATA_DIR, else ./data): a RemoteRoot or a local Path."""
    root = root if root not in (None, "") else (os.environ.get("HOMER_DATA_DIR") or "data")
    return parse_root(root) or local_path(root)


def cache_dir(root: str | os.PathLike | RemoteRoot) -> Path:
    """Where the stages work locally: for a remote root its mirror, for a local root the root itself.

    The mirror: `$HOMER_CACHE_DIR` (else ~/.cache/recurrent-homer), then one folder per root,
    `<scheme>-<readable slug>-<12 hex of the URL's hash>`.
    """
    remote = parse_root(root)
    if remote is None:
        return local_path(root)
    base = Path(os.environ.get("HOMER_CACHE_DIR") or Path.home() / ".cache" / "recurrent-homer").expanduser()
    identity = f"{remote.protocol}://{remote.base}"  # s3a:// and s3:// are one store
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", remote.base).strip("-.")[:48] or "root"
    return base.absolute() / f"{remote.protocol}-{slug}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


# ---------------------------------------------------------------------------- outputs

def remote_output_state(remote: RemoteRoot, stage: str, fp: str) -> str:
    """'complete', 'incomplete' (files but no manifest), 'damaged' or 'missing'."""
    return inspect_remote_output(remote, stage, fp)[0]


def inspect_remote_output(remote: RemoteRoot, stage: str, fp: str) -> tuple[str, list[str]]:
    """(state, problems): as remote_output_state, with each problem naming the file's URL."""
    found = _inspect(remote, stage, fp)
    return found.state, found.problems


def upload_files(remote: RemoteRoot, stage: str, fp: str, local_dir: Path) -> tuple[str, dict[str, dict]]:
    """Step 1 of publish_output: upload local_dir's files (not its manifest) to a new writer folder.

    Returns (the folder's name under `<fp>/`, the files as outputs.list_files lists them).
    Uploaded files without a manifest are an incomplete output: nothing reads them.
    """
    files = _local_files(local_dir)
    return _upload(remote, stage, fp, Path(local_dir), files), files


def publish_output(remote: RemoteRoot, stage: str, fp: str, local_dir: Path, manifest: dict) -> dict:
    """Commit a finished local output to `<root>/<stage>/<fp>/`: its files first, the manifest last, create-only.

    `manifest` is the local manifest (outputs.manifest_for); its `files`, `checksum` and `dir`
    are set here. Returns the manifest now in the store: ours, or an equal one that another
    writer committed first. An existing manifest with other files is a StoreError; a damaged
    one (listed files missing or short) is set aside and replaced.
    """
    _check_name(stage, "stage")
    _check_name(fp, "fingerprint")
    for key in ("stage", "fingerprint"):
        if manifest.get(key) not in (None, {"stage": stage, "fingerprint": fp}[key]):
            raise StoreError(f"the manifest given for {stage}/{fp} names {key} {manifest.get(key)!r}")
    files = _local_files(local_dir)
    out = remote.path(stage, fp)
    existing = _inspect(remote, stage, fp)
    if existing.state == "complete":
        if _same_files(existing.manifest.get("files"), files):
            log.info("%s is already complete with the same files; not uploading again", remote.url_of(out))
            return existing.manifest
        raise _conflict(remote, stage, fp)
    if existing.state == "damaged":
        log.warning("%s is damaged (%s); setting it aside and publishing again", remote.url_of(out), existing.problems[0])
        set_aside_remote(remote, stage, fp)
    upload = _upload(remote, stage, fp, Path(local_dir), files)
    body = dict(manifest, stage=stage, fingerprint=fp, checksum=CHECKSUM, files=files, dir=upload)
    data = json.dumps(body, indent=2, ensure_ascii=False, default=str).encode("utf-8")
    if _create_only(remote, f"{out}/{MANIFEST}", data):
        log.info("published %s (%d files, %d bytes)", remote.url_of(out), len(files), sum(e["size"] for e in files.values()))
        return body
    # Another writer committed first: keep theirs, drop our upload.
    _remove_quietly(remote, remote.path(stage, fp, upload))
    winner = _inspect(remote, stage, fp)
    if winner.state == "complete" and _same_files(winner.manifest.get("files"), files):
        log.info("%s was committed by another writer with the same files; using it", remote.url_of(out))
        return winner.manifest
    raise _conflict(remote, stage, fp)


def set_aside_remote(remote: RemoteRoot, stage: str, fp: str) -> str | None:
    """Move a damaged output's manifest to `<fp>.damaged-<time>/` (so the output reads as incomplete and
    its stage can publish it again). Returns that folder's URL; None when there was no manifest.

    Its files stay where they are until `gc` removes them (the set-aside manifest names them).
    """
    _check_name(stage, "stage")
    _check_name(fp, "fingerprint")
    source = remote.path(stage, fp, MANIFEST)
    data = _cat_or_none(remote, source)
    if data is None:
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = remote.path(stage, f"{fp}{DAMAGED}{stamp}-{uuid.uuid4().hex[:6]}")
    with _io("setting aside", remote.url_of(source)):
        remote.fs.pipe_file(f"{target}/{MANIFEST}", data)
        remote.fs.rm_file(source)
    log.warning("set aside the damaged %s output %s: %s", stage, remote.url_of(remote.path(stage, fp)), remote.url_of(target))
    return remote.url_of(target)


def materialize(remote: RemoteRoot, stage: str, fp: str, dest: Path | None = None) -> Path:
    """Download a complete remote output into the local cache; returns a complete local output.

    dest defaults to `<cache>/<stage>/<fp>`. A dest that is already complete is returned as it is.
    Files are fetched once into the blob cache (verified: size and checksum), then linked into
    dest; the manifest is written last and the folder renamed into place.
    """
    _check_name(stage, "stage")
    _check_name(fp, "fingerprint")
    cache = cache_dir(remote)
    dest = Path(dest) if dest is not None else cache / stage / fp
    if outputs.is_complete(dest):
        return dest
    found = _inspect(remote, stage, fp)
    if found.state != "complete":
        raise _not_complete(remote, stage, fp, found)
    manifest = found.manifest
    out = remote.path(stage, fp)
    data_dir = manifest.get("dir") or ""
    blobs = cache / BLOBS
    wanted: dict[Path, tuple[str, dict]] = {}  # blob -> (remote path, entry)
    plan: list[tuple[str, Path | None, str, dict]] = []  # (rel, blob or None, remote path, entry)
    for rel, entry in manifest["files"].items():
        key = _join(out, data_dir, rel)
        algorithm = _algorithm(entry)
        blob = blobs / algorithm / str(entry[algorithm]) if algorithm else None
        plan.append((rel, blob, key, entry))
        if blob is not None and blob not in wanted and not _blob_ok(blob, entry, algorithm):
            wanted[blob] = (key, entry)
    problems = _download(remote, [(key, blob, entry) for blob, (key, entry) in wanted.items()])
    if problems:
        raise _damaged(remote, stage, fp, problems)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        direct = []
        for rel, blob, key, entry in plan:
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if blob is None:
                direct.append((key, target, entry))
            else:
                _link(blob, target)
        if problems := _download(remote, direct):
            raise _damaged(remote, stage, fp, problems)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
        _install(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("materialized %s into %s (%d files, %d downloaded)", remote.url_of(out), dest, len(plan), len(wanted) + len(direct))
    return dest


def remote_checksum_problems(remote: RemoteRoot, stage: str, fp: str) -> list[str]:
    """Read every file of a complete remote output from the store and check its checksum: the problems, naming files.

    What `homer verify` does for a root in a store: the local blob cache is not consulted, so a
    file changed in the store since it was downloaded is found.
    """
    found = _inspect(remote, stage, fp)
    if found.state != "complete":
        return found.problems or [f"{remote.url_of(remote.path(stage, fp))} is {found.state}"]
    out, folder, problems = remote.path(stage, fp), found.manifest.get("dir") or "", []
    for rel, entry in found.manifest["files"].items():
        algorithm = _algorithm(entry)
        if algorithm is None:
            continue
        digest = outputs.xxhash.xxh3_128() if algorithm == "xxh3_128" else hashlib.sha256()
        key = _join(out, folder, rel)
        with _io("reading", remote.url_of(key)), remote.fs.open(key, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != entry[algorithm]:
            problems.append(f"{remote.url_of(key)}: its {algorithm} checksum differs from the manifest's (changed in the store)")
    return problems


# ---------------------------------------------------------------------------- latest

def latest_name(created: str | datetime, fp: str) -> str:
    """The latest.d entry for an output: `<created as 22 sortable UTC characters>-<fp>`."""
    _check_name(fp, "fingerprint")
    return f"{_sortable(created)}-{fp}"


def advance_latest(remote: RemoteRoot, stage: str, fp: str, created: str | datetime | None = None) -> str:
    """Record a complete output in `<stage>/latest.d/` (create-only, empty); returns the entry's name.

    created: the output's creation time (ISO 8601 or a datetime; naive means UTC), by default
    its manifest's `created`. An entry that exists already is fine (the same record).
    """
    _check_name(stage, "stage")
    found = _inspect(remote, stage, fp)
    if found.state != "complete":
        raise StoreError(f"{remote.url_of(remote.path(stage, fp))} is {found.state}, not a complete output; "
                         f"only a complete output can become latest ({found.problems[0] if found.problems else ''})")
    created = created if created is not None else found.manifest.get("created")
    if not created:
        raise StoreError(f"{remote.url_of(remote.path(stage, fp, MANIFEST))} has no `created` time; pass one")
    name = latest_name(created, fp)
    _create_only(remote, remote.path(stage, LATEST_LOG, name), b"")
    log.info("%s latest: %s", stage, name)
    return name


def read_latest(remote: RemoteRoot, stage: str) -> str | None:
    """The fingerprint of the newest complete output of a stage (greatest latest.d name); None if none."""
    _check_name(stage, "stage")
    for _, fp in latest_entries(remote, stage):
        if _inspect(remote, stage, fp).state == "complete":
            return fp
    return None


# ---------------------------------------------------------------------------- checkpoints

def push_checkpoint(remote: RemoteRoot, stage: str, fp: str, kind: str, local_ckpt: Path, step: int) -> dict:
    """Upload a checkpoint folder of a training in progress, then point `<fp>/<kind>.json` at it.

    The files go to `<fp>/<kind>.d/<step:08d>-<id>/`; the pointer ({step, dir, files, ...}) is
    overwritten in one PUT, so a reader sees the old checkpoint or the new one, never half of
    one; then the other step folders are deleted (best effort). Returns the pointer.
    """
    _check_name(stage, "stage")
    _check_name(fp, "fingerprint")
    _check_kind(kind)
    if not isinstance(step, int) or step < 0:
        raise StoreError(f"checkpoint step must be a non-negative integer, not {step!r}")
    files = _local_files(local_ckpt)
    if not files:
        raise StoreError(f"{local_ckpt} holds no checkpoint files; nothing to push")
    folder = f"{kind}.d/{step:08d}-{uuid.uuid4().hex[:8]}"
    target = remote.path(stage, fp, folder)
    _put_checked(remote, Path(local_ckpt), files, target)
    pointer = {"step": step, "dir": folder, "checksum": CHECKSUM, "files": files,
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    pointer_path = remote.path(stage, fp, f"{kind}.json")
    with _io("writing", remote.url_of(pointer_path)):
        remote.fs.pipe_file(pointer_path, json.dumps(pointer, indent=2).encode("utf-8"))
    keep = folder.rsplit("/", 1)[1]
    for old in child_names(remote, remote.path(stage, fp, f"{kind}.d")):
        if old != keep:
            _remove_quietly(remote, remote.path(stage, fp, f"{kind}.d", old))
    log.info("pushed the %s checkpoint of %s/%s at step %d (%d files)", kind, stage, fp, step, len(files))
    return pointer


def pull_checkpoint(remote: RemoteRoot, stage: str, fp: str, kind: str, dest: Path) -> Path | None:
    """Download the checkpoint `<fp>/<kind>.json` names into `dest/<kind>` (verified); None if there is none."""
    _check_name(stage, "stage")
    _check_name(fp, "fingerprint")
    _check_kind(kind)
    pointer_path = remote.path(stage, fp, f"{kind}.json")
    pointer_url = remote.url_of(pointer_path)
    for attempt in range(3):  # a trainer may replace the checkpoint (and delete the old files) while we read
        raw = _cat_or_none(remote, pointer_path)
        if raw is None:
            return None
        pointer = _parse_pointer(raw, pointer_url)
        folder = remote.path(stage, fp, pointer["dir"])
        listing = _find(remote, folder)
        problems = _size_problems(remote, folder, pointer["files"], listing)
        if problems:
            if attempt < 2 and _cat_or_none(remote, pointer_path) != raw:
                continue
            raise StoreError(f"{problems[0]}{_more(problems)}: the {kind} checkpoint that {pointer_url} names "
                             f"(step {pointer['step']}) is incomplete; delete {pointer_url} to start the "
                             f"training over, or push a new checkpoint")
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        tmp = dest / f".{kind}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            items = [(_join(folder, "", rel), tmp / rel, entry) for rel, entry in pointer["files"].items()]
            try:
                problems = _download(remote, items)
            except StoreError:
                if attempt < 2 and _cat_or_none(remote, pointer_path) != raw:
                    continue
                raise
            if problems:
                raise StoreError(f"{problems[0]}{_more(problems)}: the {kind} checkpoint that {pointer_url} names "
                                 f"(step {pointer['step']}) is damaged; delete {pointer_url} to start the "
                                 f"training over")
            final = dest / kind
            if final.exists():
                old = dest / f".{kind}.tmp-old-{uuid.uuid4().hex[:8]}"
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("pulled the %s checkpoint of %s/%s at step %s into %s", kind, stage, fp, pointer["step"], final)
        return final
    raise StoreError(f"{pointer_url} kept changing while it was read; try again")  # pragma: no cover


# ---------------------------------------------------------------------------- gc

def gc(root: str | os.PathLike | RemoteRoot, remove: bool = False, grace_s: float = GRACE_S,
       stages: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """What no one needs under an artifact root, remote or local: [(URL or path, reason)], removed if `remove`.

    Listed: incomplete outputs (files, no manifest: a crashed writer), damaged ones set aside
    (`<fp>.damaged-*`), staging leftovers (`.<fp>.tmp-*`), unreachable outputs (neither a
    stage's latest nor an input, through the manifests' `inputs`, of one, transitively), and
    on a remote root abandoned upload folders, finished checkpoints and stale latest entries.
    Never removed: an output a latest reaches; anything written within `grace_s` seconds
    (it may be a writer at work: listed as "in progress?"); and while such a writer is at work,
    no unreachable output either (it may be reading one). Only folders named like outputs
    (16 hex characters) are considered, so other files under the root are never touched.
    `stages`: the stage folders to look at (default: every folder of the root).
    """
    remote = parse_root(root)
    if remote is None:
        return _gc_local(local_path(root), remove, grace_s, stages)
    return _gc_remote(remote, remove, grace_s, stages)


def _gc_remote(remote: RemoteRoot, remove: bool, grace_s: float, stages: Iterable[str] | None) -> list[tuple[str, str]]:
    now = time.time()
    stage_names = list(stages) if stages is not None else child_names(remote, remote.base)
    found: dict[tuple[str, str], _Found] = {}
    rows: list[tuple[str, str, list[str]]] = []  # (url, reason, paths to remove, manifest first)
    for stage in stage_names:
        for name in child_names(remote, remote.path(stage)):
            if FINGERPRINT_RE.match(name):
                found[(stage, name)] = _inspect(remote, stage, name)
            elif DAMAGED in name and FINGERPRINT_RE.match(name.split(DAMAGED, 1)[0]):
                path = remote.path(stage, name)
                rows.append((remote.url_of(path), "damaged: an output set aside to be rebuilt", [path]))

    def manifest_of(key: tuple[str, str]) -> dict | None:
        if key not in found:
            found[key] = _inspect(remote, *key)
        return found[key].manifest if found[key].state == "complete" else None

    entries = {stage: latest_entries(remote, stage) for stage in stage_names}
    heads = []
    for stage, stage_entries in entries.items():
        head = next(((stage, fp) for _, fp in stage_entries if manifest_of((stage, fp)) is not None), None)
        if head:
            heads.append(head)
    reach = _reachable(heads, manifest_of)

    ages = {key: now - _newest(f.listing.values(), now) for key, f in found.items() if f.state != "missing"}
    busy = any(f.state == "incomplete" and ages[key] < grace_s for key, f in found.items())
    doomed: set[tuple[str, str]] = set()
    for key, f in sorted(found.items()):
        stage, fp = key
        if f.state == "missing":
            continue
        out = remote.path(stage, fp)
        url, age = remote.url_of(out), _ago(ages[key])
        if key in reach:
            if f.state == "complete":
                rows.extend(_finished_leftovers(remote, out, f, now, grace_s))
            continue
        if f.state == "incomplete":
            if ages[key] < grace_s:
                rows.append((url, f"in progress?: no {MANIFEST}, last written {age} ago (a writer may be at work); kept", []))
            else:
                rows.append((url, f"incomplete: no {MANIFEST}, last written {age} ago (a writer that never finished)", [out]))
                doomed.add(key)
        elif ages[key] < grace_s:
            rows.append((url, f"unreachable ({f.state}), but written {age} ago: it may be about to become latest; kept", []))
        elif busy:
            rows.append((url, f"unreachable ({f.state}), but kept: a writer is at work and may be reading it", []))
        else:
            rows.append((url, f"unreachable ({f.state}): not a latest output nor an input of one", [out]))
            doomed.add(key)
    for stage, stage_entries in entries.items():
        for stamp, fp in stage_entries:
            if (stage, fp) not in found:
                found[(stage, fp)] = _inspect(remote, stage, fp)
            if (stage, fp) in doomed or found[(stage, fp)].state == "missing":
                path = remote.path(stage, LATEST_LOG, f"{stamp}-{fp}")
                rows.append((remote.url_of(path), f"stale latest entry: output {fp} is gone or being removed", [path]))
    if remove:
        for url, reason, paths in rows:
            for path in paths:
                _remove_remote_tree(remote, path)
            if paths:
                log.info("gc: removed %s (%s)", url, reason)
    return [(url, reason) for url, reason, _ in rows]


def _finished_leftovers(remote: RemoteRoot, out: str, found: _Found, now: float, grace_s: float) -> list[tuple[str, str, list[str]]]:
    """In a complete output: upload folders its manifest does not name, and checkpoints of its training."""
    data_dir = (found.manifest.get("dir") or "").strip("/")
    listed = {_join(out, data_dir, rel) for rel in found.manifest.get("files", {})}
    groups: dict[str, list[dict]] = {}
    for path, info in found.listing.items():
        if path in listed or path == f"{out}/{MANIFEST}":
            continue
        first = path[len(out) + 1:].split("/", 1)[0]
        groups.setdefault(first, []).append(info)
    rows = []
    for first, infos in sorted(groups.items()):
        path = f"{out}/{first}"
        if first.startswith(UPLOAD_PREFIX) and first != data_dir:
            if now - _newest(infos, now) >= grace_s:
                rows.append((remote.url_of(path), "abandoned upload: a writer's files that no manifest names", [path]))
        elif (first.endswith(".d") or first.endswith(".json")) and data_dir:
            rows.append((remote.url_of(path), "finished checkpoint: a checkpoint of a training whose output is complete", [path]))
    return rows


def _gc_local(root: Path, remove: bool, grace_s: float, stages: Iterable[str] | None) -> list[tuple[str, str]]:
    now = time.time()
    if stages is None:
        stages = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    states: dict[tuple[str, str], str] = {}
    rows: list[tuple[str, str, Path | None]] = []
    for stage in stages:
        stage_dir = root / stage
        if not stage_dir.is_dir():
            continue
        for child in sorted(stage_dir.iterdir()):
            name = child.name
            if FINGERPRINT_RE.match(name) and child.is_dir():
                states[(stage, name)] = outputs.output_state(child)
            elif DAMAGED in name and FINGERPRINT_RE.match(name.split(DAMAGED, 1)[0]):
                rows.append((str(child), "damaged: an output set aside to be rebuilt", child))
            elif name.startswith(".") and (".tmp-" in name or (name.startswith(f".{LATEST}.") and name.endswith(".tmp"))):
                age = now - _local_newest(child)
                if age < grace_s:
                    rows.append((str(child), f"in progress?: a staging folder written {_ago(age)} ago; kept", None))
                else:
                    rows.append((str(child), f"staging leftover: written {_ago(age)} ago by a run that did not finish", child))

    def manifest_of(key: tuple[str, str]) -> dict | None:
        try:
            return json.loads((root / key[0] / key[1] / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    heads = []
    for stage in stages:
        try:
            fp = (root / stage / LATEST).read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if fp:
            heads.append((stage, fp))
    reach = _reachable(heads, manifest_of)
    ages = {key: now - _local_newest(root / key[0] / key[1]) for key in states}
    held = {key for key in states if states[key] == "incomplete" and _lock_held(root / key[0] / f".{key[1]}.lock")}
    busy = bool(held) or any(states[key] == "incomplete" and ages[key] < grace_s for key in states)
    for key, state in sorted(states.items()):
        if key in reach:
            continue
        path, age = root / key[0] / key[1], _ago(ages[key])
        if state == "incomplete":
            if key in held or ages[key] < grace_s:
                why = "a writer holds its lock" if key in held else f"last written {age} ago"
                rows.append((str(path), f"in progress?: no {MANIFEST}, {why}; kept", None))
            else:
                rows.append((str(path), f"incomplete: no {MANIFEST}, last written {age} ago (a writer that never finished)", path))
        elif ages[key] < grace_s:
            rows.append((str(path), f"unreachable ({state}), but written {age} ago: it may be about to become latest; kept", None))
        elif busy:
            rows.append((str(path), f"unreachable ({state}), but kept: a writer is at work and may be reading it", None))
        else:
            rows.append((str(path), f"unreachable ({state}): not a latest output nor an input of one", path))
    if remove:
        for where, reason, path in rows:
            if path is not None:
                _remove_local(path)
                log.info("gc: removed %s (%s)", where, reason)
    return [(where, reason) for where, reason, _ in rows]


def _reachable(heads: list[tuple[str, str]], manifest_of) -> set[tuple[str, str]]:
    """The outputs reachable from the heads through the manifests' `inputs` refs, transitively."""
    seen: set[tuple[str, str]] = set()
    todo = list(heads)
    while todo:
        key = todo.pop()
        if key in seen:
            continue
        seen.add(key)
        manifest = manifest_of(key) or {}
        inputs = manifest.get("inputs") if isinstance(manifest, dict) else None
        for ref in (inputs or {}).values() if isinstance(inputs, dict) else ():
            if isinstance(ref, dict) and isinstance(ref.get("stage"), str) and isinstance(ref.get("fingerprint"), str):
                todo.append((ref["stage"], ref["fingerprint"]))
    return seen


# ---------------------------------------------------------------------------- helpers

def _inspect(remote: RemoteRoot, stage: str, fp: str) -> _Found:
    _check_name(stage, "stage")
    _check_name(fp, "fingerprint")
    out = remote.path(stage, fp)
    manifest_url = remote.url_of(f"{out}/{MANIFEST}")
    raw = _cat_or_none(remote, f"{out}/{MANIFEST}")  # the manifest first, then the listing: files precede it
    listing = _find(remote, out)
    if raw is None:
        if not listing:
            return _Found("missing", [f"{remote.url_of(out)} does not exist"], None, listing)
        return _Found("incomplete", [f"{manifest_url} is missing ({len(listing)} object(s) under {remote.url_of(out)}/ "
                                     f"without one: a writer that never finished, or one still at work)"], None, listing)
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        return _Found("damaged", [f"{manifest_url} does not parse ({exc})"], None, listing)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return _Found("damaged", [f"{manifest_url} is not a manifest (no file list)"], None, listing)
    data_dir = manifest.get("dir") or ""
    if not isinstance(data_dir, str) or (data_dir and not _safe_rel(data_dir)):
        return _Found("damaged", [f"{manifest_url} names an unusable folder {data_dir!r}"], None, listing)
    bad = [rel for rel, entry in manifest["files"].items() if not _safe_rel(rel) or not isinstance(entry, dict)]
    if bad:
        return _Found("damaged", [f"{manifest_url} lists unusable entries {bad[:3]}"], None, listing)
    problems = _size_problems(remote, _join(out, data_dir, ""), manifest["files"], listing)
    return _Found("damaged" if problems else "complete", problems, manifest, listing)


def _size_problems(remote: RemoteRoot, folder: str, files: dict, listing: dict[str, dict]) -> list[str]:
    problems = []
    for rel, entry in files.items():
        key = _join(folder, "", rel)
        want = entry.get("size") if isinstance(entry, dict) else None
        info = listing.get(key)
        if info is None:
            problems.append(f"{remote.url_of(key)} is missing (the manifest lists it, {want} bytes)")
        elif int(info.get("size", -1)) != want:
            problems.append(f"{remote.url_of(key)} is {info.get('size')} bytes, the manifest says {want}")
    return problems


def _upload(remote: RemoteRoot, stage: str, fp: str, local_dir: Path, files: dict[str, dict]) -> str:
    _check_name(stage, "stage")
    _check_name(fp, "fingerprint")
    upload = f"{UPLOAD_PREFIX}{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}"
    _put_checked(remote, local_dir, files, remote.path(stage, fp, upload))
    return upload


def _put_checked(remote: RemoteRoot, local_dir: Path, files: dict[str, dict], target: str) -> None:
    """Upload files (rel -> entry) from local_dir to target/, then check that all arrived at their sizes."""
    if not files:
        return
    rels = list(files)
    with _io("uploading to", remote.url_of(target)):
        remote.fs.put([str(local_dir / rel) for rel in rels], [_join(target, "", rel) for rel in rels])
    problems = _size_problems(remote, target, files, _find(remote, target))
    if problems:
        raise StoreError(f"{problems[0]}{_more(problems)}: the upload from {local_dir} did not arrive whole "
                         f"(a file changed while it was uploaded?); nothing was committed, try again")


def _download(remote: RemoteRoot, items: list[tuple[str, Path, dict]]) -> list[str]:
    """Download (remote path, local target, entry) items, each verified before it takes its target's name.

    Returns the problems (the remote file's URL, what is wrong); a transport failure is a StoreError.
    """
    if not items:
        return []
    tmps = []
    for _, target, _ in items:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmps.append(target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    problems = []
    try:
        with _io("downloading from", remote.url_of(items[0][0])):
            remote.fs.get([key for key, _, _ in items], [str(tmp) for tmp in tmps])
        for (key, target, entry), tmp in zip(items, tmps):
            want = entry.get("size")
            got = tmp.stat().st_size
            algorithm = _algorithm(entry)
            if got != want:
                problems.append(f"{remote.url_of(key)} downloaded as {got} bytes, the manifest says {want}")
            elif algorithm and (digest := outputs._digest(tmp, algorithm)) != entry[algorithm]:
                problems.append(f"{remote.url_of(key)} does not match its checksum ({algorithm} {digest[:12]}..., "
                                f"the manifest says {str(entry[algorithm])[:12]}...)")
            else:
                os.replace(tmp, target)
    finally:
        for tmp in tmps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return problems


def _blob_ok(blob: Path, entry: dict, algorithm: str) -> bool:
    """A cached blob of the right size and checksum (a bad one is deleted, to be fetched again)."""
    try:
        if blob.stat().st_size == entry.get("size") and outputs._digest(blob, algorithm) == entry[algorithm]:
            return True
    except FileNotFoundError:
        return False
    log.warning("the cached blob %s does not match its name; fetching it again", blob)
    with contextlib.suppress(FileNotFoundError):
        blob.unlink()
    return False


def _link(blob: Path, target: Path) -> None:
    try:
        os.link(blob, target)
    except OSError:  # another filesystem, or no hard links: copy
        shutil.copyfile(blob, target)


def _install(tmp: Path, dest: Path) -> None:
    """Rename a finished mirror into place; one that another process finished first is kept."""
    try:
        os.rename(tmp, dest)
        return
    except OSError:
        pass
    state = outputs.output_state(dest)
    if state == "complete":
        return
    if state == "damaged":
        outputs.set_aside(dest)
    else:  # an unfinished mirror (a download that was killed): ours to replace
        stale = dest.parent / f".{dest.name}.tmp-stale-{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(dest, stale)
            shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, dest)
    except OSError:
        if not outputs.is_complete(dest):
            raise StoreError(f"cannot put the downloaded output in place at {dest}; move that folder away") from None


def _create_only(remote: RemoteRoot, path: str, data: bytes) -> bool:
    """Write an object only if it does not exist (S3 If-None-Match: *). False if it did."""
    try:
        remote.fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:
        return False
    except Exception as exc:
        if isinstance(exc, _PROGRAMMING_ERRORS):
            raise
        raise StoreError(f"writing {remote.url_of(path)} failed: {_describe(exc)}; {_hint(exc)}") from exc


def _cat_or_none(remote: RemoteRoot, path: str) -> bytes | None:
    try:
        return remote.fs.cat_file(path)
    except FileNotFoundError:
        return None
    except Exception as exc:
        if isinstance(exc, _PROGRAMMING_ERRORS):
            raise
        raise StoreError(f"reading {remote.url_of(path)} failed: {_describe(exc)}; {_hint(exc)}") from exc


def _find(remote: RemoteRoot, folder: str) -> dict[str, dict]:
    """Every object under folder/ (path -> info)."""
    try:
        found = remote.fs.find(folder, detail=True)
    except FileNotFoundError:
        return {}
    except Exception as exc:
        if isinstance(exc, _PROGRAMMING_ERRORS):
            raise
        raise StoreError(f"listing {remote.url_of(folder)} failed: {_describe(exc)}; {_hint(exc)}") from exc
    return {name.rstrip("/"): info for name, info in found.items() if info.get("type", "file") != "directory"}


def child_names(remote: RemoteRoot, folder: str) -> list[str]:
    """The names of the folders and objects directly under folder/."""
    try:
        entries = remote.fs.ls(folder, detail=True)
    except FileNotFoundError:
        return []
    except Exception as exc:
        if isinstance(exc, _PROGRAMMING_ERRORS):
            raise
        raise StoreError(f"listing {remote.url_of(folder)} failed: {_describe(exc)}; {_hint(exc)}") from exc
    prefix = folder.rstrip("/") + "/"
    return sorted({e["name"].rstrip("/")[len(prefix):] for e in entries if e["name"].rstrip("/").startswith(prefix)} - {""})


def latest_entries(remote: RemoteRoot, stage: str) -> list[tuple[str, str]]:
    """(stamp, fp) of every latest.d entry, newest first."""
    pairs = [m.groups() for name in child_names(remote, remote.path(stage, LATEST_LOG)) if (m := _LATEST_ENTRY.match(name))]
    return sorted(pairs, reverse=True)


def _remove_remote_tree(remote: RemoteRoot, path: str) -> None:
    """Delete a folder or object; an output's manifest goes first, so a reader never sees it without its files."""
    with _io("removing", remote.url_of(path)):
        with contextlib.suppress(FileNotFoundError):
            remote.fs.rm_file(f"{path}/{MANIFEST}")
        listing = _find(remote, path)
        if listing:
            remote.fs.rm(sorted(listing))
        elif _cat_or_none(remote, path) is not None:
            remote.fs.rm_file(path)


def _remove_quietly(remote: RemoteRoot, path: str) -> None:
    try:
        _remove_remote_tree(remote, path)
    except StoreError as exc:
        log.warning("could not remove %s (gc will): %s", remote.url_of(path), exc)


def _remove_local(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        gone = path.parent / f".{path.name.lstrip('.')}.tmp-gc-{uuid.uuid4().hex[:8]}"  # disappear at once
        try:
            os.rename(path, gone)
        except FileNotFoundError:
            return
        shutil.rmtree(gone, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _lock_held(lock: Path) -> bool:
    """True if another open file holds the flock of an existing lock file (outputs.exclusive)."""
    try:
        with open(lock, "rb") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    except OSError:
        return False


def _local_newest(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for folder, dirs, names in os.walk(path):
            for name in dirs + names:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime)
    return newest


def _newest(infos: Iterable[dict], now: float) -> float:
    """The newest modification time among object infos (`now` when none is known: treated as young)."""
    times = [t for t in (_mtime(info) for info in infos) if t is not None]
    return max(times) if times else now


def _mtime(info: dict) -> float | None:
    for key in ("LastModified", "last_modified", "mtime", "updated", "modified", "creation_time"):
        value = info.get(key)
        if isinstance(value, datetime):
            return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
                return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()
    return None


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}min"
    return f"{seconds / 3600:.1f}h"


def _sortable(created: str | datetime) -> str:
    try:
        when = created if isinstance(created, datetime) else datetime.fromisoformat(str(created).replace("Z", "+00:00"))
    except ValueError:
        raise StoreError(f"{created!r} is not an ISO 8601 time (like 2026-12-02T10:26:31+00:00)") from None
    when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    stamp = when.astimezone(timezone.utc).strftime(LATEST_STAMP)
    if len(stamp) != 22:
        raise StoreError(f"{created!r} is outside the years 1000-9999")
    return stamp


def _parse_pointer(raw: bytes, url: str) -> dict:
    try:
        pointer = json.loads(raw)
    except ValueError as exc:
        raise StoreError(f"{url} does not parse ({exc}); delete it to start the training over") from None
    ok = (isinstance(pointer, dict) and isinstance(pointer.get("step"), int) and isinstance(pointer.get("files"), dict)
          and isinstance(pointer.get("dir"), str)
          and _safe_rel(pointer["dir"]) and all(_safe_rel(rel) and isinstance(e, dict) for rel, e in pointer["files"].items()))
    if not ok:
        raise StoreError(f"{url} is not a checkpoint pointer (step, dir, files); delete it to start the training over")
    return pointer


def _local_files(local_dir: Path) -> dict[str, dict]:
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise StoreError(f"{local_dir} is not a directory; nothing to upload")
    return list_files(local_dir)


def _same_files(a: Any, b: Any) -> bool:
    """Same names, sizes and checksums (in an algorithm both have)."""
    if not isinstance(a, dict) or not isinstance(b, dict) or set(a) != set(b):
        return False
    for rel, x in a.items():
        y = b[rel]
        if not isinstance(x, dict) or not isinstance(y, dict) or x.get("size") != y.get("size"):
            return False
        common = [k for k in ("xxh3_128", "sha256") if k in x and k in y]
        if not common or any(x[k] != y[k] for k in common):
            return False
    return True


def _algorithm(entry: dict) -> str | None:
    for name in ("xxh3_128", "sha256"):
        if name in entry and (name != "xxh3_128" or outputs.xxhash is not None):
            return name
    return None


def _join(folder: str, sub: str, rel: str) -> str:
    return "/".join(p.strip("/") for p in (folder, sub, rel) if p and p.strip("/"))


def _safe_rel(rel: Any) -> bool:
    return (isinstance(rel, str) and bool(rel) and not rel.startswith("/") and "\\" not in rel
            and all(part not in ("", ".", "..") for part in rel.split("/")))


def _check_name(value: Any, what: str) -> None:
    if not isinstance(value, str) or not _NAME.match(value):
        raise StoreError(f"{value!r} is not a usable {what} name (letters, digits, '_', '-', '.')")


def _check_kind(kind: Any) -> None:
    _check_name(kind, "checkpoint kind")
    if kind.startswith(UPLOAD_PREFIX) or kind == "manifest":
        raise StoreError(f"{kind!r} is reserved; name the checkpoint kind otherwise (last, best)")


def _more(problems: list[str]) -> str:
    return f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""


def _damaged(remote: RemoteRoot, stage: str, fp: str, problems: list[str]) -> DamagedOutputError:
    url = remote.url_of(remote.path(stage, fp))
    return DamagedOutputError(f"{problems[0]}{_more(problems)}: the {stage} output {url} is damaged; "
                              f"{remake_hint(stage)}", url, stage, fp)


def _not_complete(remote: RemoteRoot, stage: str, fp: str, found: _Found) -> StoreError:
    url = remote.url_of(remote.path(stage, fp))
    if found.state == "missing":
        return StoreError(f"{url} does not exist: there is no '{stage}' output {fp} under {remote.url}; "
                          f"run `homer stage {stage}`")
    if found.state == "incomplete":
        return StoreError(f"{url} is not a complete '{stage}' output (no {MANIFEST}): it was never finished, or is "
                          f"still being written; run `homer stage {stage}` (an interrupted training run resumes)")
    return _damaged(remote, stage, fp, found.problems)


def _conflict(remote: RemoteRoot, stage: str, fp: str) -> StoreError:
    url = remote.url_of(remote.path(stage, fp))
    return StoreError(f"{url} was committed with other files than this run's (another run of the same '{stage}' "
                      f"output finished first; two runs of one output at once); it is kept and this run's upload "
                      f"discarded: use the committed output, or remove it (`homer gc`) to publish again")


def _describe(exc: BaseException) -> str:
    if type(exc).__name__ == "FSTimeoutError":
        return (f"no answer within {store_timeout_s():g} s (FSTimeoutError; {STORE_TIMEOUT_ENV} sets the limit, "
                f"for a slow link raise it)")
    return _scrub(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def _hint(exc: BaseException) -> str:
    text = f"{type(exc).__name__} {exc}".lower()
    if isinstance(exc, PermissionError) or any(w in text for w in ("credential", "accessdenied", "access denied", "forbidden", "signature")):
        return ("check the store's credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile, "
                "GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*) and that they may read and write the bucket")
    if any(w in text for w in ("connect", "endpoint", "timeout", "timed out", "resolve")):
        return "check the store's address (AWS_ENDPOINT_URL for an S3-compatible store) and the network"
    if "bucket" in text or isinstance(exc, FileNotFoundError):
        return "check that the bucket exists and the URL names it"
    return "check the store's address, credentials and bucket"


def _scrub(text: str) -> str:
    """Remove the values of known secret variables from a message (a library's message could echo one)."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _redacted(url: str) -> str:
    """A URL for messages: no user/password, no query or fragment."""
    match = _URL.match(url.strip())
    if not match:
        return url
    rest = url.strip()[match.end():]
    host, _, path = rest.partition("/")
    if "@" in host:
        host = "***@" + host.rsplit("@", 1)[1]
    path = re.split(r"[?#]", path, maxsplit=1)[0]
    return f"{match.group(1)}://{host}/{path}".rstrip("/")


@contextlib.contextmanager
def _io(what: str, url: str) -> Iterator[None]:
    """Turn a store library's error into a StoreError naming the URL and what to check."""
    try:
        yield
    except StoreError:
        raise
    except Exception as exc:
        if isinstance(exc, _PROGRAMMING_ERRORS):
            raise
        raise StoreError(f"{what} {url} failed: {_describe(exc)}; {_hint(exc)}") from exc
