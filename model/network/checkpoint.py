"""Checkpoint directories: save and load weights, optimizer, RNG and run state, never unpickling.

A checkpoint is a directory (`last/`, `best/`) holding

    model.safetensors      the weights
    optimizer.safetensors  the optimizer's tensors, keys "state.<param>.<name>"
    optimizer.json         the optimizer's other state and its param_groups
    state.json             step, position, LR, metrics, RNG states, model and train config,
                           vocabulary fingerprint (written last)
    vocab.json             the vocabulary, so a checkpoint alone is enough to generate
    tokenizer.json         with prepare.tokenizer bpe: the BPE itself (vocab.json names it)

It is written into `<name>.tmp-<pid>` and renamed into place; an existing checkpoint is
first renamed to `<name>.old`, so a crash at any point leaves one loadable directory and
loading falls back to `<name>.old` when `<name>` is missing.

    save_checkpoint(out / "last", model=m, vocab=v, model_config=cfg, state={...}, optimizer=opt)
    model, vocab, state = load_model_from_checkpoint(out / "best", device="cpu")
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from model.network.rnn import CharRNN, ModelConfig, build_model, count_parameters
from model.data.vocab import Vocab

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit what it is loaded for."""


def _load_tensors(file: Path, device: str = "cpu") -> dict:
    """safetensors' load_file, with an error that names the file and the stage that remakes it."""
    from safetensors import SafetensorError

    try:
        return load_file(file, device=device)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file} is truncated or corrupt ({type(exc).__name__}: {exc}){_remake(file)}") from exc


def _remake(file: Path) -> str:
    """What remakes a checkpoint file: its stage output, an interrupted run, or nothing (a bare checkpoint)."""
    from model.store.outputs import damaged_file_hint

    if hint := damaged_file_hint(file):
        return hint
    run_dir = Path(file).absolute().parent.parent  # <root>/<stage>/<fp>/{last,best}/model.safetensors
    if run_dir.parent.name in ("pretrain", "finetune"):
        return (f": the interrupted {run_dir.parent.name} run {run_dir} cannot resume from it; move {Path(file).parent} "
                f"aside and re-run `homer stage {run_dir.parent.name}` (it starts over)")
    return "; it belongs to no stage output, so no stage remakes it: save it again or use another checkpoint"


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_snapshot() -> tuple:
    """The python, numpy (global) and torch (CPU and every CUDA device) RNG states, copied cheaply (no JSON yet)."""
    return (random.getstate(), np.random.get_state(legacy=False), torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def capture_rng(snapshot: tuple | None = None) -> dict:
    """The RNG states now (or those of an earlier `rng_snapshot()`) as JSON."""
    (version, internal, gauss), np_state, cpu, cuda = snapshot or rng_snapshot()
    np_state = dict(np_state, state=dict(np_state["state"], key=np_state["state"]["key"].tolist()))
    return {
        "python": [version, list(internal), gauss],
        "numpy": np_state,
        "torch": _b64(cpu),
        "cuda": [_b64(s) for s in cuda],
    }


def restore_rng(rng: dict) -> None:
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(rng["numpy"], state=dict(rng["numpy"]["state"]))
    np_state["state"]["key"] = np.asarray(np_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(np_state)
    torch.set_rng_state(_unb64(rng["torch"]))
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in rng["cuda"]])


def _optimizer_split(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(tensors with flattened keys, the JSON-able rest) of an optimizer state_dict."""
    sd = optimizer.state_dict()
    tensors, rest = {}, {}
    for pid, entries in sd["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                rest.setdefault(str(pid), {})[name] = value
    return tensors, {"state": rest, "param_groups": sd["param_groups"]}


def _optimizer_join(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {int(pid): dict(entries) for pid, entries in meta["state"].items()}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    # JSON turned tuples (Adam's betas) into lists; "params" is the one list
    groups = [{k: v if k == "params" or not isinstance(v, list) else tuple(v) for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _write_json(path: Path, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(path, *, model: CharRNN, vocab: Vocab, model_config: ModelConfig, state: dict,
                    optimizer: torch.optim.Optimizer | None = None, rng: tuple | None = None) -> Path:
    """Write a checkpoint directory atomically; `state` is the caller's JSON-able run state.

    state.json gets `state` plus format, model_config, vocab_fingerprint, num_parameters and
    the RNG states: those of `rng` (an earlier `rng_snapshot()`), else the current ones.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f"{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
    if optimizer is not None:
        tensors, meta = _optimizer_split(optimizer)
        save_file(tensors, tmp / "optimizer.safetensors")
        _write_json(tmp / "optimizer.json", meta)
    vocab.save(tmp / "vocab.json")
    _write_json(tmp / "state.json", {
        **state,
        "format": FORMAT_VERSION,
        "model_config": model_config.model_dump(),
        "vocab_fingerprint": vocab.fingerprint,
        "num_parameters": count_parameters(model),
        "rng": capture_rng(rng),
    })
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def resolve_checkpoint(path) -> Path | None:
    """The complete checkpoint directory at `path`, else its `.old` sibling, else None."""
    path = Path(path)
    for candidate in (path, path.with_name(f"{path.name}.old")):
        if (candidate / "state.json").is_file():
            return candidate
    return None


def read_state(path) -> dict:
    found = resolve_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path}: no checkpoint here (no state.json in it or in {Path(path).name}.old)")
    try:
        state = json.loads((found / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{found}/state.json is unreadable ({exc})") from exc
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{found}: checkpoint format {state.get('format')} is not {FORMAT_VERSION}")
    return dict(state, path=str(found))


def check_compatible(state: dict, *, vocab: Vocab | None = None, model_config: ModelConfig | None = None) -> None:
    """Raise CheckpointError naming what differs between the checkpoint and what is asked."""
    where = state["path"]
    if vocab is not None and state["vocab_fingerprint"] != vocab.fingerprint:
        raise CheckpointError(
            f"checkpoint {where} was trained with vocabulary {state['vocab_fingerprint']} but the shards use "
            f"{vocab.fingerprint}; re-run prepare or pick a matching checkpoint"
        )
    if model_config is not None:
        ours, theirs = model_config.model_dump(), state["model_config"]
        diff = {k: (theirs.get(k), ours[k]) for k in ours if theirs.get(k) != ours[k]}
        if diff:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs asked {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(f"checkpoint {where} has a different architecture ({detail}); "
                                  f"use its model config or pick a matching checkpoint")


def load_checkpoint(path, model: CharRNN, optimizer: torch.optim.Optimizer | None = None, *,
                    vocab: Vocab | None = None, model_config: ModelConfig | None = None,
                    restore_rng_state: bool = False) -> dict:
    """Load weights (and optimizer state, and RNG states if asked) into the given objects.

    Checks vocabulary and architecture first when `vocab` / `model_config` are given.
    Returns state.json's content, with `path` set to the directory actually read.
    """
    state = read_state(path)
    check_compatible(state, vocab=vocab, model_config=model_config)
    found = Path(state["path"])
    device = next(model.parameters()).device
    try:
        model.load_state_dict(_load_tensors(found / "model.safetensors", device=str(device)))
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {found}: weights do not fit the model ({exc})") from exc
    if optimizer is not None:
        if not (found / "optimizer.safetensors").is_file():
            raise CheckpointError(f"checkpoint {found} holds no optimizer state")
        meta = json.loads((found / "optimizer.json").read_text(encoding="utf-8"))
        optimizer.load_state_dict(_optimizer_join(_load_tensors(found / "optimizer.safetensors"), meta))
    if restore_rng_state:
        restore_rng(state["rng"])
    return state


def load_model_from_checkpoint(path, device: str | torch.device | None = None) -> tuple[CharRNN, Vocab, dict]:
    """Build the checkpoint's model from its own config and vocabulary, on `device` (default cpu), in eval mode."""
    state = read_state(path)
    vocab = Vocab.load(Path(state["path"]) / "vocab.json")
    check_compatible(state, vocab=vocab)
    cfg = ModelConfig.model_validate(state["model_config"])
    model = build_model(cfg, vocab.size).to(device or "cpu")
    load_checkpoint(state["path"], model, vocab=vocab, model_config=cfg)
    return model.eval(), vocab, state


def resolve_model(root, given, stages: tuple[str, ...] = ("finetune", "pretrain"), label: str = "--checkpoint"):
    """The one resolver of a model to load or start from, as a StageRef.

    `given` is 'latest' or empty (the latest output of the first of `stages` that has a
    `latest`; a `latest` that names a missing, incomplete or damaged output is an error
    naming the file, never a fall-through to the next stage), a fingerprint or output
    directory of one of `stages`, or a bare checkpoint directory (stage "checkpoint",
    fingerprinted by its weights). A stage output's checksums are checked. Errors name
    `label`, what was given and what to do. `choose_model` also says how it was chosen.
    """
    return choose_model(root, given, stages, label)[0]


def describe_model(ref, why: str) -> str:
    """'<checkpoint dir> (<why>)', e.g. '.../finetune/<fp>/best (finetune/latest)': a line saying what was used and why."""
    return f"{model_checkpoint(ref)} ({why})"


def choose_model(root, given, stages: tuple[str, ...] = ("finetune", "pretrain"), label: str = "--checkpoint"):
    """resolve_model's (ref, why): why is 'finetune/latest', 'pretrain fingerprint <fp>', 'the checkpoint directory given', ...."""
    import hashlib

    from model.store.outputs import LATEST, StageRef, StoreError, has_latest, has_output, latest, resolve, verify_output

    def checked(ref):  # loading reads the files anyway: check their checksums first, naming a damaged one
        verify_output(ref.dir, ref.stage, checksums=True)
        return ref

    root = Path(root)
    if isinstance(given, StageRef):
        return given, "given"
    if given in (None, "", LATEST):
        for stage in stages:
            if has_latest(root, stage):
                return checked(latest(root, stage)), f"{stage}/{LATEST}"
        raise StoreError(f"{label}: no {' or '.join(stages)} output under {root}; train first (homer run) "
                         f"or pass a fingerprint or checkpoint directory")
    given = str(given)
    for stage in stages:
        if "/" not in given and has_output(root, stage, given):
            return checked(resolve(root, stage, given)), f"{stage} fingerprint {given}"
    path = Path(given)
    if path.is_dir() and (path / "manifest.json").is_file():
        from model.store.outputs import owning_output

        stage = (owning_output(path / "manifest.json") or (None, stages[0]))[1]
        return checked(resolve(root, stage, path)), f"the {stage} output given"
    if resolve_checkpoint(path) is not None:
        from model.store.outputs import owning_output

        found = resolve_checkpoint(path)
        if owner := owning_output(found):  # e.g. <root>/finetune/<fp>/best: check the output it belongs to
            verify_output(owner[0], owner[1], checksums=True)
        digest = hashlib.sha256((found / "model.safetensors").read_bytes()).hexdigest()[:16]
        return StageRef(stage="checkpoint", fingerprint=digest, path=str(path.absolute())), "the checkpoint directory given"
    raise StoreError(f"{label} {given}: not 'latest', a {' or '.join(stages)} fingerprint under {root}, "
                     f"an output directory or a checkpoint directory (one holding state.json)")


def model_checkpoint(ref) -> Path:
    """The checkpoint directory a model ref stands for: a training output's best/, or the checkpoint itself."""
    return ref.dir / "best" if (ref.dir / "best").is_dir() else ref.dir
