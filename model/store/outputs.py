"""The artifact store: fingerprinted, self-describing, atomically written stage outputs.

A stage's output lives in `<root>/<stage>/<fingerprint>/`. The fingerprint hashes the
stage name, its config, its inputs' fingerprints and a stage code version, so the same
inputs always name the same directory and a complete directory is reused, never
recomputed. Data stages write into a temporary sibling and rename it into place;
`<root>/<stage>/latest` holds the newest complete fingerprint. Every output carries
`manifest.json` (stage, fingerprint, config, inputs, counts, metrics, versions, and
`files`: every file of the output with its size and checksum).

Complete means a manifest that parses and whose listed files all exist at their recorded
sizes (`is_complete`, a few stats). Checksums are checked when a stage reads its inputs
(`verify_output(..., checksums=True)`, from tasks.common.run_stage_task) and by
`homer verify`. A damaged output (a listed file missing or of another size, a bad
checksum, a manifest that does not parse) is reported with the file and the stage that
remakes it; re-running that stage moves it aside (`<fp>.damaged-<time>`) and rebuilds it.

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

try:
    import xxhash
except ImportError:  # pragma: no cover - xxhash is a dependency; sha256 keeps old environments working
    xxhash = None

MANIFEST = "manifest.json"
LATEST = "latest"
FINGERPRINT_CHARS = 16
DAMAGED = ".damaged-"  # `<fp>.damaged-<time>`: a damaged output moved aside to be rebuilt
CHECKSUM = "xxh3_128" if xxhash is not None else "sha256"
_CHUNK = 1 << 20


class StoreError(RuntimeError):
    """An artifact cannot be found, read or written."""


ROOT_MARKER = ".homer-root"  # in the local mirror of a remote root (model.store.remote.cache_dir): the root's URL
_MIRRORS: dict[str, Any] = {}  # mirror path -> its RemoteRoot (None: a local root)


def _is_url(text: str) -> bool:
    head, sep, _ = text.partition("://")
    return bool(sep) and head.isalnum()


class StageRef(BaseModel):
    """A small, serialisable pointer to one complete stage output."""

    stage: str  # stage name, e.g. "prepare"
    fingerprint: str  # hash of the stage's name, config, inputs and code version
    path: str  # the output directory

    @property
    def dir(self) -> Path:
        """The output as a local folder: for an output in an object store, its local mirror (downloaded once, verified)."""
        if _is_url(self.path):
            return _materialized(self.path)
        return Path(self.path)

    def manifest(self) -> dict:
        if _is_url(self.path):  # read it in the store: no need to download the output for it
            return _remote_manifest(self.path)
        return read_manifest(self.dir)


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The local side of the artifact root (the argument, else $HOMER_DATA_DIR, else ./data).

    A path or file:// URL is the root itself. For s3://, gs:// or az:// it is the root's local
    mirror (`model.store.remote.cache_dir`), marked with the URL: stages work on local files,
    and `staging`, `set_latest`, `latest`, `resolve` and `StageRef.dir` sync with the store.
    Pass `root_name(root)`, not the path, to another process or machine.
    """
    given = root if root not in (None, "") else (os.environ.get("HOMER_DATA_DIR") or "data")
    if isinstance(given, Path) or not _is_url(str(given).strip()):
        return Path(given).expanduser().absolute()
    from model.store import remote as remote_store

    found = remote_store.parse_root(str(given))
    if found is None:  # file://
        return remote_store.local_path(str(given))
    mirror = remote_store.cache_dir(found)
    marker = mirror / ROOT_MARKER
    if not marker.is_file():
        mirror.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(marker, found.url)
    _MIRRORS[str(mirror)] = found
    return mirror


def remote_of(root: Path):
    """The RemoteRoot whose local mirror `root` is; None for a local root."""
    key = str(root)
    if key not in _MIRRORS:
        marker = Path(root) / ROOT_MARKER
        found = None
        if marker.is_file():
            from model.store import remote as remote_store

            found = remote_store.parse_root(json.loads(marker.read_text(encoding="utf-8")))
        _MIRRORS[key] = found
    return _MIRRORS[key]


def root_name(root: Path) -> str:
    """The artifact root as another process or machine must be given it: the store's URL, else the path."""
    remote = remote_of(root)
    return remote.url if remote is not None else str(root)


def ref_for(root: Path, stage: str, fp: str) -> "StageRef":
    """The ref of the output `<root>/<stage>/<fp>`: a URL in an object store (valid on every machine), else its path."""
    remote = remote_of(root)
    if remote is not None:
        return StageRef(stage=stage, fingerprint=fp, path=f"{remote.url}/{stage}/{fp}")
    return StageRef(stage=stage, fingerprint=fp, path=str(output_dir(root, stage, fp)))


def _split_output_url(url: str) -> tuple[str, str, str]:
    root, stage, fp = url.rstrip("/").rsplit("/", 2)
    return root, stage, fp


def _remote_manifest(url: str) -> dict:
    root, stage, fp = _split_output_url(url)
    remote = remote_of(data_root(root))
    try:
        return json.loads(remote.fs.cat_file(remote.path(stage, fp, MANIFEST)))
    except FileNotFoundError:
        raise StoreError(f"{url}: no {MANIFEST}; the output is incomplete or was never written") from None
    except ValueError as exc:
        raise StoreError(f"{url}/{MANIFEST}: not valid JSON ({exc})") from exc


def _materialized(url: str) -> Path:
    from model.store import remote as remote_store

    root, stage, fp = _split_output_url(url)
    mirror = data_root(root)
    local = output_dir(mirror, stage, fp)
    if is_complete(local):
        return local
    return remote_store.materialize(remote_of(mirror), stage, fp, local)


def fingerprint_view(model: BaseModel) -> dict:
    """A config as JSON without the fields marked `json_schema_extra={"fingerprint": False}`.

    Those fields (log intervals, retries) change how a stage runs, not what it makes:
    changing one resumes or reuses the output instead of starting over. Fields marked
    `{"fingerprint": "unless-default"}` are left out only while they hold their defaults.
    """
    dump = model.model_dump(mode="json")
    for name, field in type(model).model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        value = getattr(model, name)
        if extra.get("fingerprint") is False:
            dump.pop(name, None)
        elif extra.get("fingerprint") == "unless-default" and value == field.default:  # a field added later: old outputs keep their fingerprints
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
    """A manifest that parses and whose listed files all exist at their recorded sizes."""
    return output_state(path) == "complete"


def output_state(path: Path, checksums: bool = False) -> str:
    """'complete', 'incomplete' (no manifest: never finished, still being written, or not ours) or 'damaged'."""
    return inspect_output(Path(path), checksums)[0]


def inspect_output(path: Path, checksums: bool = False) -> tuple[str, list[str]]:
    """(state, problems): state as in output_state, problems naming each damaged file."""
    path = Path(path)
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return "incomplete", [f"{path} does not exist" if not path.is_dir() else f"{manifest_path} is missing"]
    except (OSError, ValueError) as exc:
        return "damaged", [f"{manifest_path} does not parse ({exc})"]
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        return "damaged", [f"{manifest_path} is not a manifest (no stage, no file list)"]
    problems = file_problems(path, manifest.get("files") or {}, checksums)  # no "files": an older manifest, trusted
    return ("damaged" if problems else "complete"), problems


def file_problems(path: Path, files: dict, checksums: bool = False) -> list[str]:
    """What is wrong with the files a manifest lists: missing, another size, (with checksums) other content."""
    problems = []
    for rel, entry in files.items():
        file = Path(path) / rel
        want = int(entry.get("size", -1)) if isinstance(entry, dict) else -1
        try:
            stat = file.stat()
        except FileNotFoundError:
            problems.append(f"{file} is missing (the manifest lists it, {want} bytes)")
            continue
        except OSError as exc:
            problems.append(f"{file} cannot be read ({exc.strerror or exc})")
            continue
        if stat.st_size != want:
            problems.append(f"{file} is {stat.st_size} bytes, the manifest says {want}")
        elif checksums:
            algorithm = next((a for a in ("xxh3_128", "sha256") if a in entry), None)
            if algorithm is None or (algorithm == "xxh3_128" and xxhash is None):
                continue  # nothing we can check it against
            try:
                got = _digest(file, algorithm, stat)
            except OSError as exc:
                problems.append(f"{file} cannot be read ({exc.strerror or exc})")
                continue
            if got != entry[algorithm]:
                problems.append(f"{file} does not match its checksum ({algorithm} {got[:12]}..., "
                                f"the manifest says {str(entry[algorithm])[:12]}...)")
    return problems


_DIGESTS: dict[tuple, str] = {}  # (path, algorithm, size, mtime, ctime, inode) -> digest: a settled file is hashed once per process


def _digest(file: Path, algorithm: str, stat: os.stat_result | None = None) -> str:
    stat = stat or file.stat()
    key = (str(file), algorithm, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    if (known := _DIGESTS.get(key)) is not None:
        return known
    h = xxhash.xxh3_128() if algorithm == "xxh3_128" else hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if time.time() - stat.st_mtime > 2:  # a file changed within a timestamp tick of hashing could look unchanged
        _DIGESTS[key] = digest
    return digest


def list_files(path: Path, checksums: bool = True) -> dict[str, dict]:
    """Every file of an output (relative POSIX path -> size and checksum), without the manifest and scratch.

    Scratch: hidden names, `*.tmp-*` and `*.old` (a checkpoint save's leftovers).
    """
    path = Path(path)
    files = {}
    for file in sorted(path.rglob("*")):
        rel = file.relative_to(path)
        if rel.as_posix() == MANIFEST or file.is_symlink() or not file.is_file():
            continue
        if any(part.startswith(".") or ".tmp-" in part or part.endswith(".old") for part in rel.parts):
            continue
        stat = file.stat()
        entry = {"size": stat.st_size}
        if checksums:
            entry[CHECKSUM] = _digest(file, CHECKSUM, stat)
        files[rel.as_posix()] = entry
    return files


def _stage_of(path: Path) -> str:
    try:
        stage = json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("stage")
    except (OSError, ValueError, AttributeError):
        stage = None
    return stage if isinstance(stage, str) and stage else path.parent.name  # outputs live in <root>/<stage>/<fp>


def remake_hint(stage: str) -> str:
    return f"re-run `homer stage {stage}` with the config that made it (the damaged copy is moved aside and rebuilt)"


def damage_message(path: Path, problems: list[str], stage: str | None = None) -> str:
    """'<file> is 12 bytes, the manifest says 34: the prepare output is damaged; re-run `homer stage prepare` ...'."""
    stage = stage or _stage_of(Path(path))
    more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    return f"{problems[0]}{more}: the {stage} output {Path(path)} is damaged; {remake_hint(stage)}"


def verify_output(path: Path, stage: str | None = None, checksums: bool = False, via: str = "") -> None:
    """Raise a StoreError naming the damaged file and the stage that remakes it, if the output is not complete."""
    path = Path(path)
    state, problems = inspect_output(path, checksums)
    if state == "complete":
        return
    stage = stage or _stage_of(path)
    if state == "incomplete":
        what = "does not exist" if not path.is_dir() else f"is not a complete '{stage}' output (no {MANIFEST})"
        raise StoreError(f"{via}{path} {what}: it was never finished, or is still being written; "
                         f"run `homer stage {stage}` (an interrupted training run resumes)")
    raise StoreError(via + damage_message(path, problems, stage))


def owning_output(file: Path) -> tuple[Path, str] | None:
    """The stage output a file belongs to (the nearest folder, up to 4 above it, holding a manifest) and its stage."""
    for parent in list(Path(file).absolute().parents)[:4]:  # <out>/shards/<corpus>/<shard> is the deepest
        if (parent / MANIFEST).is_file():
            return parent, _stage_of(parent)
    return None


def damaged_file_hint(file: Path) -> str:
    """': the prepare output <dir> is damaged; re-run ...' for a file of a stage output, else ''."""
    owner = owning_output(file)
    if owner is None:
        return ""
    out, stage = owner
    return f": the {stage} output {out} is damaged; {remake_hint(stage)}"


def set_aside(path: Path) -> Path | None:
    """Rename a damaged output to `<fp>.damaged-<UTC time>` beside it (kept for inspection); None if it is gone."""
    path = Path(path)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}{DAMAGED}{stamp}")
    if target.exists():
        target = path.with_name(f"{target.name}-{uuid.uuid4().hex[:6]}")
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return None  # another run moved it first
    return target


def stage_outputs(root: Path, stage: str) -> list[Path]:
    """The fingerprint folders of a stage (not `latest`, temporaries, locks or outputs set aside)."""
    stage_dir = Path(root) / stage
    if not stage_dir.is_dir():
        return []
    return sorted(p for p in stage_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and DAMAGED not in p.name)


def verify_stage(root: Path, stage: str, checksums: bool = True) -> list[tuple[str, Path, str]]:
    """(state, path, detail) for every output of a stage and for its `latest`; state is ok, damaged or incomplete.

    For a root in an object store the outputs are those in the store (path: their URL as a
    PurePosixPath): sizes there, and with `checksums` every file read back from the store.
    """
    if (remote := remote_of(root)) is not None:
        return _verify_remote_stage(root, remote, stage, checksums)
    rows = []
    for out in stage_outputs(root, stage):
        state, problems = inspect_output(out, checksums)
        if state == "complete":
            try:
                listed = read_manifest(out).get("files")
            except StoreError:
                listed = None
            detail = (f"{len(listed)} files, {sum(e.get('size', 0) for e in listed.values())} bytes"
                      + (", checksums match" if checksums else ", sizes match")) if listed is not None else \
                "an older manifest without a file list: nothing to check"
            rows.append(("ok", out, detail))
        elif state == "damaged":
            rows.append(("damaged", out, damage_message(out, problems, stage)))
        else:
            rows.append(("incomplete", out, f"no {MANIFEST}: never finished or still being written; "
                                            f"`homer stage {stage}` finishes it (training resumes)"))
    pointer = Path(root) / stage / LATEST
    if pointer.is_file():
        fp = pointer.read_text(encoding="utf-8").strip()
        if not output_dir(root, stage, fp).is_dir():
            rows.append(("damaged", pointer, f"{pointer} names {fp}, but {output_dir(root, stage, fp)} does not exist; "
                                             f"re-run `homer stage {stage}`"))
    return rows


def _verify_remote_stage(root: Path, remote, stage: str, checksums: bool) -> list[tuple[str, Path, str]]:
    from pathlib import PurePosixPath

    from model.store import remote as remote_store

    rows = []
    for fp in remote_store.child_names(remote, remote.path(stage)):
        if not remote_store.FINGERPRINT_RE.match(fp):
            continue
        url = f"{remote.url}/{stage}/{fp}"
        state, problems = remote_store.inspect_remote_output(remote, stage, fp)
        if state == "complete" and checksums and (problems := remote_store.remote_checksum_problems(remote, stage, fp)):
            state = "damaged"
        if state == "complete":
            rows.append(("ok", PurePosixPath(url), "sizes and checksums match" if checksums else "sizes match"))
        elif state == "incomplete":
            rows.append(("incomplete", PurePosixPath(url), f"no {MANIFEST}: never finished, still being written, or a "
                                                           f"crashed writer's (`homer gc` lists it); `homer stage {stage}` finishes it"))
        else:
            rows.append(("damaged", PurePosixPath(url), f"{problems[0] if problems else state}; re-run `homer stage {stage}` "
                                                        f"to set it aside and rebuild it"))
    return rows


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
    """Write the manifest, listing every file of the output (size and checksum): write it last."""
    _write_json_atomic(Path(path) / MANIFEST, dict(manifest, checksum=CHECKSUM, files=list_files(path)))


def has_latest(root: Path, stage: str) -> bool:
    """Whether the stage has a `latest` at all (in the store for a remote root); `latest()` then says if it is intact."""
    remote = remote_of(root)
    if remote is not None:
        from model.store import remote as remote_store

        return bool(remote_store.latest_entries(remote, stage))
    return (Path(root) / stage / LATEST).exists()


def has_output(root: Path, stage: str, fp: str) -> bool:
    """Whether `<root>/<stage>/<fp>` exists in any state (in the store for a remote root)."""
    remote = remote_of(root)
    if remote is not None:
        from model.store import remote as remote_store

        return remote_store.remote_output_state(remote, stage, fp) != "missing"
    return output_dir(root, stage, fp).is_dir()


def output_complete(root: Path, stage: str, fp: str) -> bool:
    """Whether `<root>/<stage>/<fp>` is complete: in the store for a remote root (the store is the truth), else on disk."""
    remote = remote_of(root)
    if remote is not None:
        from model.store import remote as remote_store

        return remote_store.remote_output_state(remote, stage, fp) == "complete"
    return is_complete(output_dir(root, stage, fp))


def publish_to_store(root: Path, stage: str, fp: str, local_dir: Path) -> None:
    """For a root in an object store: commit a finished local output there (files, then the manifest, create-only)."""
    remote = remote_of(root)
    if remote is not None:
        from model.store import remote as remote_store

        remote_store.publish_output(remote, stage, fp, local_dir, read_manifest(local_dir))


def set_latest(root: Path, stage: str, fp: str) -> None:
    """Make `fp` the stage's latest: `<root>/<stage>/latest` (and, for a store, its create-only latest log)."""
    remote = remote_of(root)
    if remote is not None:
        from model.store import remote as remote_store

        remote_store.advance_latest(remote, stage, fp)
    stage_dir = Path(root) / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = stage_dir / f".{LATEST}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(fp + "\n", encoding="utf-8")
    os.replace(tmp, stage_dir / LATEST)


def latest(root: Path, stage: str, intact: bool = True) -> StageRef:
    """The newest complete output of a stage; a clear error if there is none.

    A `latest` naming a missing, incomplete or damaged output is an error naming the file.
    intact=False only asks for a manifest that parses: enough to read the config a damaged
    output was made with, so that re-running its stage can rebuild it.
    """
    remote = remote_of(root)
    if remote is not None:
        from model.store import remote as remote_store

        fp = remote_store.read_latest(remote, stage)
        if fp is None:
            raise StoreError(f"no complete '{stage}' output in {remote.url} (nothing in {remote.url}/{stage}/"
                             f"{remote_store.LATEST_LOG}/ names one); run `homer stage {stage}` or the whole pipeline "
                             f"first, or pass the input explicitly")
        ref = ref_for(root, stage, fp)
        if not intact:
            read_manifest(ref.dir)
        return ref
    path = Path(root) / stage / LATEST
    try:
        fp = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise StoreError(
            f"no complete '{stage}' output under {Path(root)} (no {path}); run `homer stage {stage}` "
            f"or the whole pipeline first, or pass the input explicitly"
        ) from None
    out = output_dir(root, stage, fp)
    if intact:
        verify_output(out, stage, via=f"{path} names {fp}, but ")
    else:
        read_manifest(out)
    return StageRef(stage=stage, fingerprint=fp, path=str(out))


def resolve(root: Path, stage: str, given: "StageRef | str | None") -> StageRef:
    """An input ref from a ref, a fingerprint, a path, 'latest' or None (= latest)."""
    if isinstance(given, StageRef):
        ref = given
    elif isinstance(given, dict):
        ref = StageRef.model_validate(given)
    elif given in (None, "", LATEST):
        return latest(root, stage)
    elif _is_url(str(given)):
        ref = StageRef(stage=_split_output_url(str(given))[1], fingerprint=_split_output_url(str(given))[2], path=str(given))
    elif "/" not in str(given) and remote_of(root) is not None:
        ref = ref_for(root, stage, str(given))
    elif "/" not in str(given) and (candidate := output_dir(root, stage, str(given))).is_dir():
        ref = StageRef(stage=stage, fingerprint=str(given), path=str(candidate))
    elif Path(given).is_dir():
        manifest = read_manifest(Path(given))
        ref = StageRef(stage=manifest.get("stage", stage), fingerprint=manifest["fingerprint"], path=str(Path(given).absolute()))
    else:
        raise StoreError(f"'{given}' is neither a '{stage}' fingerprint under {root / stage} nor an output directory")
    if ref.stage != stage:
        raise StoreError(f"{ref.path} is a '{ref.stage}' output, but a '{stage}' output is needed here")
    verify_output(ref.dir, stage)  # sizes; a stage about to run checks its inputs' checksums too
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
        publish_to_store(root, stage, fp, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Renames are atomic, so a run that got here first left a complete output: keep it.
            state = output_state(final)
            if state == "damaged":  # ours, but damaged: keep it aside, put the new one in its place
                set_aside(final)
                os.rename(tmp, final)
            elif state != "complete":
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
