"""The artifact store: fingerprinted, self-describing, atomically written stage outputs.

A stage's output lives in `<root>/<stage>/<fingerprint>/`. The fingerprint hashes the
stage name, its config, its inputs' fingerprints and a stage code version, so the same
inputs always name the same directory and a complete directory is reused, never
recomputed. Data stages write into a temporary sibling and rename it into place;
`<root>/<stage>/latest` holds the newest complete fingerprint. Every output carries
`manifest.json` (stage, fingerprint, config, inputs, counts, metrics, versions).

    ref = StageRef(stage="prepare", fingerprint=fp, path=str(dir))
    with staging(root, "prepare", fp) as tmp:      # write files into tmp
        ...
    publish(...)  # done by `staging` on success: manifest, rename, latest
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import time
import uuid
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

MANIFEST = "manifest.json"
LATEST = "latest"
FINGERPRINT_CHARS = 16


class StoreError(RuntimeError):
    """An artifact cannot be found, read or written."""


class StageRef(BaseModel):
    """A small, serialisable pointer to one complete stage output."""

    stage: str  # stage name, e.g. "prepare"
    fingerprint: str  # hash of the stage's name, config, inputs and code version
    path: str  # the output directory

    @property
    def dir(self) -> Path:
        return Path(self.path)

    def manifest(self) -> dict:
        return read_manifest(self.dir)


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The artifact root: the argument, else $HOMER_DATA_DIR, else ./data."""
    return Path(root or os.environ.get("HOMER_DATA_DIR") or "data").absolute()


def fingerprint_view(model: BaseModel) -> dict:
    """A config as JSON without the fields marked `json_schema_extra={"fingerprint": False}`.

    Those fields (log intervals, retries) change how a stage runs, not what it makes:
    changing one resumes or reuses the output instead of starting over.
    """
    dump = model.model_dump(mode="json")
    for name, field in type(model).model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        value = getattr(model, name)
        if extra.get("fingerprint") is False:
            dump.pop(name, None)
        elif isinstance(value, BaseModel):
            dump[name] = fingerprint_view(value)
    return dump


def fingerprint(stage: str, config: Any, inputs: dict[str, str], code_version: str) -> str:
    """Stable hash of everything that determines a stage's output."""
    if isinstance(config, BaseModel):
        config = fingerprint_view(config)
    blob = json.dumps(
        {"stage": stage, "config": config, "inputs": dict(sorted(inputs.items())), "code": code_version},
        sort_keys=True,
        ensure_ascii=False,
        default=str,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:FINGERPRINT_CHARS]


def output_dir(root: Path, stage: str, fp: str) -> Path:
    return Path(root) / stage / fp


def is_complete(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: Path) -> dict:
    try:
        return json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{path}: no {MANIFEST}; the output is incomplete or was never written") from None
    except ValueError as exc:
        raise StoreError(f"{path / MANIFEST}: not valid JSON ({exc})") from exc


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("recurrent-homer", "torch", "pyarrow", "numpy", "datasets", "kagglehub", "prefect"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


def manifest_for(stage: str, fp: str, config: Any, inputs: dict[str, "StageRef"], counts: dict, metrics: dict | None = None) -> dict:
    if isinstance(config, BaseModel):
        config = config.model_dump(mode="json")
    return {
        "stage": stage,
        "fingerprint": fp,
        "config": config,
        "inputs": {k: v.model_dump() for k, v in inputs.items()},
        "counts": counts,
        "metrics": metrics or {},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(),
    }


def write_manifest(path: Path, manifest: dict) -> None:
    _write_json_atomic(Path(path) / MANIFEST, manifest)


def set_latest(root: Path, stage: str, fp: str) -> None:
    stage_dir = Path(root) / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = stage_dir / f".{LATEST}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(fp + "\n", encoding="utf-8")
    os.replace(tmp, stage_dir / LATEST)


def latest(root: Path, stage: str) -> StageRef:
    """The newest complete output of a stage; a clear error if there is none."""
    path = Path(root) / stage / LATEST
    try:
        fp = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise StoreError(
            f"no complete '{stage}' output under {Path(root)} (no {path}); run `homer stage {stage}` "
            f"or the whole pipeline first, or pass the input explicitly"
        ) from None
    out = output_dir(root, stage, fp)
    if not is_complete(out):
        raise StoreError(f"{path} names {fp}, but {out} is not complete; re-run `homer stage {stage}`")
    return StageRef(stage=stage, fingerprint=fp, path=str(out))


def resolve(root: Path, stage: str, given: "StageRef | str | None") -> StageRef:
    """An input ref from a ref, a fingerprint, a path, 'latest' or None (= latest)."""
    if isinstance(given, StageRef):
        ref = given
    elif isinstance(given, dict):
        ref = StageRef.model_validate(given)
    elif given in (None, "", LATEST):
        return latest(root, stage)
    elif "/" not in str(given) and (candidate := output_dir(root, stage, str(given))).is_dir():
        ref = StageRef(stage=stage, fingerprint=str(given), path=str(candidate))
    elif Path(given).is_dir():
        manifest = read_manifest(Path(given))
        ref = StageRef(stage=manifest.get("stage", stage), fingerprint=manifest["fingerprint"], path=str(Path(given).absolute()))
    else:
        raise StoreError(f"'{given}' is neither a '{stage}' fingerprint under {root / stage} nor an output directory")
    if ref.stage != stage:
        raise StoreError(f"{ref.path} is a '{ref.stage}' output, but a '{stage}' output is needed here")
    if not is_complete(ref.dir):
        raise StoreError(f"{ref.path} is not a complete '{stage}' output (no {MANIFEST})")
    return ref


def check_writable(root: Path) -> None:
    """Fail early, naming the root and the setting, if outputs cannot be written there."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StoreError(
            f"the artifact root {root} is not writable ({exc.strerror or exc}); "
            f"set HOMER_DATA_DIR to a writable directory"
        ) from exc


@contextlib.contextmanager
def staging(root: Path, stage: str, fp: str) -> Iterator[Path]:
    """Yield a temporary directory; on success it becomes `<root>/<stage>/<fp>`.

    The caller writes its files and manifest into the temporary directory. If the
    body raises, the temporary directory is removed and nothing else changes. If
    another run published the same fingerprint first, its output is kept and ours
    is discarded: same fingerprint, same content.
    """
    check_writable(root)
    final = output_dir(root, stage, fp)
    tmp = final.parent / f".{fp}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if not is_complete(tmp):
            raise StoreError(f"stage {stage} wrote no {MANIFEST}; its output is not published")
        try:
            os.rename(tmp, final)
        except OSError:
            # Renames are atomic, so a run that got here first left a complete output: keep it.
            if not is_complete(final):
                raise StoreError(f"{final} exists but is not a complete output (no {MANIFEST}); "
                                 f"it was not written by this pipeline: move it away and run again") from None
        set_latest(root, stage, fp)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def exclusive(root: Path, stage: str, fp: str, wait_s: float = 24 * 3600) -> Iterator[None]:
    """An inter-process lock for stages that write in place (training resumes)."""
    lock_dir = Path(root) / stage
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f".{fp}.lock", "w") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreError(f"another run holds {lock_dir}/.{fp}.lock") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
