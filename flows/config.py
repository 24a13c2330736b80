"""The typed pipeline config: one pydantic model per stage, composed into PipelineConfig.

Pydantic makes each deployment's run form in the Prefect UI. Defaults are the published
recipe; the `sample` profile switches both sources to the bundled data and shrinks the
model so `make run` finishes in minutes on a CPU; the `cpu` profile trains the real
corpora, cut to a few MB, in about 30 minutes on a laptop CPU. Precedence: defaults < profile <
YAML file (--config) < --set dotted.key=value.

    cfg = load_config(profile="sample", sets=["prepare.seq_len=50"])
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from model.network.config import ModelConfig
from model.training.overrides import apply_sets
from model.data.prepare import PrepareConfig
from model.data.sources import SimpsonsConfig, WikipediaConfig
from model.training.config import FinetuneTrainConfig, TrainConfig

Profile = Literal["default", "sample", "cpu"]
Temperature = Annotated[float, Field(gt=0, le=1000, allow_inf_nan=False)]  # a softmax temperature: finite, above 0


class ConfigError(ValueError):
    """A config with one or more problems; the message lists each, naming the field."""


class PretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig, description="the network (the published recipe by default)")
    train: TrainConfig = Field(default_factory=TrainConfig, description="optimiser, schedule and loop settings")


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    init_from: str | None = Field(None, description="checkpoint to start from: a pretrain fingerprint, a checkpoint or output directory; empty = the latest pretrain's best/")
    train: FinetuneTrainConfig = Field(default_factory=FinetuneTrainConfig, description="loop settings: a fresh optimiser, 1e-5 for 4 epochs, then x exp(-0.1) per epoch")


class GenerateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field("latest", description="'latest' (newest finetune, else pretrain), a fingerprint or a checkpoint directory")
    prompt: str = Field("Marge, ", description="text the samples continue")
    length: int = Field(200, ge=1, le=100_000, description="tokens to generate per sample: characters, or words / BPE pieces with prepare.tokenizer word / bpe")
    num_samples: int = Field(3, ge=1, le=1024, description="samples generated at once, as one batch")
    temperature: float = Field(0.8, gt=0, le=1000, allow_inf_nan=False, description="softmax temperature")
    top_k: int | None = Field(None, ge=1, le=1_000_000, description="sample from the k most likely characters only")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="sample from the smallest set whose probability reaches p")
    greedy: bool = Field(False, description="always take the most likely character")
    beam_width: int | None = Field(None, ge=1, le=1024, description="beam search with this many beams; returns the num_samples best beams, best first")
    seed: int = Field(0, description="random seed")


class ReportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temperatures: list[Temperature] = Field([0.5, 1.0, 1.2], min_length=1, max_length=32, description="sampling temperatures shown in the report (each above 0)")
    prompt: str = Field("Marge, ", description="prompt of the report's samples")
    length: int = Field(200, ge=1, le=100_000, description="tokens per sample: characters, or words / BPE pieces with prepare.tokenizer word / bpe")
    num_samples: int = Field(2, ge=1, le=1024, description="samples per temperature")
    seed: int = Field(0, description="random seed of the samples")


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    profile: Profile = Field("default", description="the profile these values started from (informational)")
    wikipedia: WikipediaConfig = Field(default_factory=WikipediaConfig, description="pretraining articles")
    simpsons: SimpsonsConfig = Field(default_factory=SimpsonsConfig, description="the dialogue lines to fine-tune on")
    prepare: PrepareConfig = Field(default_factory=PrepareConfig, description="corpora, vocabulary and shards")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="pretraining on the articles")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="fine-tuning on the character's lines")
    report: ReportConfig = Field(default_factory=ReportConfig, description="evaluation and samples")


PROFILES: dict[str, dict[str, Any]] = {
    "default": {},
    "sample": {  # bundled data and one GRU layer: the whole run takes about 2 minutes on 2 CPU cores
        "wikipedia": {"source": "sample"},
        "simpsons": {"source": "sample"},
        "prepare": {"lines_per_doc": 10},
        "pretrain": {
            "model": {"embedding_dim": 64, "hidden_sizes": [256], "dropout": 0.1},
            "train": {"learning_rate": 3e-3, "epochs": 25, "constant_epochs": 15, "batch_size": 32,
                      "checkpoint_every_steps": 100, "log_every_steps": 50, "early_stopping_patience": 3},
        },
        "finetune": {
            "train": {"learning_rate": 1e-3, "epochs": 15, "constant_epochs": 8, "batch_size": 16,
                      "checkpoint_every_steps": 100, "log_every_steps": 25, "early_stopping_patience": 3},
        },
        "report": {"length": 120},
    },
    "cpu": {  # the real corpora, cut to a few MB, and a model and schedule for about 30 minutes on a laptop CPU
        "wikipedia": {"max_articles": 1000},
        "prepare": {"lines_per_doc": 10},
        "pretrain": {
            "model": {"embedding_dim": 64, "hidden_sizes": [384], "dropout": 0.1},
            # the step budget is the limit (3000 x 64 x 100 characters: about 30 minutes at 11k chars/s),
            # early stopping the other; epochs only bound a small corpus
            "train": {"learning_rate": 2e-3, "batch_size": 64, "epochs": 50, "constant_epochs": 3, "max_steps": 3000,
                      "early_stopping_patience": 2, "eval_every_steps": 500, "max_val_windows": 2000, "device": "cpu"},
        },
        "finetune": {
            "train": {"learning_rate": 3e-4, "batch_size": 64, "epochs": 50, "constant_epochs": 2, "max_steps": 600,
                      "early_stopping_patience": 2, "eval_every_steps": 100, "max_val_windows": 2000, "device": "cpu"},
        },
    },
}


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def format_errors(error: ValidationError, source: str = "config") -> str:
    lines = [f"{len(error.errors())} problem(s) in the {source}:"]
    for e in error.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(root)"
        got = "" if e["type"] == "missing" else f" (got {e.get('input')!r})"
        lines.append(f"  - {field}: {e['msg']}{got}")
    return "\n".join(lines)


def load_config(profile: str = "default", file: str | Path | None = None, sets: list[str] | None = None) -> PipelineConfig:
    """Defaults < profile < YAML file < --set; every problem is reported at once."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    data = deep_merge(PROFILES[profile], {"profile": profile})
    if file:
        path = Path(file)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"--config {path}: cannot read ({exc.strerror})") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {path}: not valid YAML ({exc})") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: expected a mapping of sections, got {type(loaded).__name__}")
        data = deep_merge(data, loaded)
    problems = apply_sets(data, sets or [])
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        problems.extend(format_errors(exc).splitlines()[1:])
        config = None
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in the config:\n" + "\n".join(f"  {p.strip()}" if p.strip().startswith("-") else f"  - {p}" for p in problems))
    return config


# ------------------------------------------------------------------ re-running one stage

StartFrom = Literal["latest", "config"]


def explicit_fields(model: BaseModel) -> dict:
    """The fields of a config that were given (by a profile, a file, --set or run parameters), nested, as JSON."""
    dump = model.model_dump(mode="json")
    out = {}
    for name in model.model_fields_set:
        value = getattr(model, name)
        out[name] = explicit_fields(value) if isinstance(value, BaseModel) else dump[name]
    return out


def start_from_latest(config: BaseModel, manifest_config: dict | None) -> BaseModel:
    """`config` as a re-run means it: the config of the stage's latest output with only the given fields changed.

    `manifest_config` is that output's config, from its manifest; None (no output yet) keeps
    `config` as it is, defaults and all.
    """
    if manifest_config is None:
        return config
    made = what_it_made(type(config), manifest_config)
    return type(config).model_validate(deep_merge(deep_merge(config.model_dump(mode="json"), made), explicit_fields(config)))


def what_it_made(model_cls: type[BaseModel], data: dict) -> dict:
    """`data` (a config dump) less the fields marked `json_schema_extra={"fingerprint": False}`.

    Those say where and how a run goes (a Dask scheduler's address, a rendezvous endpoint, log
    intervals), not what it makes: a re-run takes them from its own config, never from the last
    output's, so an old address cannot come back with "like last time".
    """
    out = {}
    for name, value in data.items():
        field = model_cls.model_fields.get(name)
        if field is None:
            out[name] = value  # an unknown field: let validation name it
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("fingerprint") is False:
            continue
        sub = field.annotation
        if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
            out[name] = what_it_made(sub, value)
        else:
            out[name] = value
    return out


def overrides(value: BaseModel | dict, default: BaseModel | dict) -> dict:
    """The fields of `value` that differ from `default`, nested (lists compare whole)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(default, BaseModel):
        default = default.model_dump(mode="json")
    out = {}
    for key, item in value.items():
        base = default.get(key)
        if isinstance(item, dict) and isinstance(base, dict):
            if nested := overrides(item, base):
                out[key] = nested
        elif key not in default or item != base:
            out[key] = item
    return out


def changed_fields(before: dict, after: dict) -> list[str]:
    """Dotted names of the fields whose values differ between two config dumps."""

    def dotted(tree: dict, prefix: str = "") -> list[str]:
        return [name for key, value in sorted(tree.items())
                for name in (dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])]

    return dotted(overrides(after, before))


def stage_config(root, stage: str, config: BaseModel, start_from: StartFrom = "latest") -> tuple[BaseModel, str]:
    """The config a run of one stage uses, and a line saying what it started from.

    start_from="latest" (a stage run on its own: the CLI, its deployment, the UI's form) takes
    the config of the stage's latest output and changes only the fields given; "config" (the
    pipeline, an explicit --profile) uses `config` as it is.
    """
    from flows.naming import rename_run_for
    from model.store.outputs import has_latest, latest

    if start_from == "config":
        return config, "the given config"
    if not has_latest(Path(root), stage):
        return config, "the given config (no earlier output to start from)"
    ref = latest(root, stage, intact=False)  # its config is enough; a damaged output is rebuilt by the run itself
    base = ref.manifest()["config"]
    resolved = start_from_latest(config, base)
    changed = changed_fields(base, resolved.model_dump(mode="json"))
    rename_run_for(resolved)  # the name was made from the fields given, before this merge
    return resolved, f"the config of {stage} {ref.fingerprint} (its latest output), changed: {', '.join(changed) or 'nothing'}"
