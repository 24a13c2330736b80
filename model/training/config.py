"""The training loop's config: TrainConfig (the published pretraining recipe) and FinetuneTrainConfig.

Plain pydantic, no torch at import time, so the flows' typed config (flows/config.py), the CLI and the
data stages' processes load it without importing torch; model/training/loop.py runs it.

    cfg = TrainConfig(learning_rate=3e-3, epochs=10)
    FinetuneTrainConfig().learning_rate   # 1e-5: the fine-tuning recipe under partial overrides
"""

from __future__ import annotations

from typing import Literal

from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError


class TrainConfig(BaseModel):
    """How to train; the defaults are the published pretraining recipe."""

    model_config = ConfigDict(extra="forbid")

    learning_rate: PositiveFloat = Field(1e-3, allow_inf_nan=False, description="Adam learning rate during the constant epochs")
    batch_size: PositiveInt = Field(64, description="windows per optimizer step")
    epochs: PositiveInt = Field(50, description="passes over the training windows (at most; early stopping may end sooner)")
    max_steps: PositiveInt | None = Field(None, description="stop after this many optimizer steps in all (a step budget)")
    constant_epochs: NonNegativeInt = Field(5, description="epochs at the full rate (0-based epochs 0 .. constant_epochs-1); each later epoch multiplies it by exp(-0.1)")
    grad_clip: PositiveFloat = Field(5.0, allow_inf_nan=False, description="clip the global gradient norm to this")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: fp32 (with TF32 matmuls on CUDA when allow_tf32); bf16/fp16 autocast need CUDA (fp16 uses a GradScaler)")
    allow_tf32: bool = Field(True, description="let CUDA matmuls and cuDNN use TF32 for fp32 math")
    device: str = Field("auto", description="torch device (cpu, cuda, cuda:1, ...); auto picks cuda when available")
    # Several processes (DDP under torchrun): model/training/distributed.py. The world size changes the floating
    # point (how the gradient is summed), so it is part of the fingerprint; where the processes meet is not.
    nproc_per_node: PositiveInt = Field(1, description="training processes on each machine (DDP: gloo on CPU, NCCL on GPU "
                                        "with cuda:LOCAL_RANK each); 1 = train in the task's own process. batch_size is "
                                        "the global batch: each process takes batch_size / (nproc_per_node × nnodes)")
    nnodes: PositiveInt = Field(1, description="machines training together (each runs the same stage); more than 1 needs rdzv_endpoint")
    rdzv_endpoint: str | None = Field(None, description="host:port where the machines' processes meet (torchrun's c10d "
                                      "rendezvous, hosted by the machine that is host); empty = a free local port (one machine)",
                                      json_schema_extra={"fingerprint": False})
    rdzv_id: str | None = Field(None, description="the rendezvous id, the same on every machine; empty = the output "
                                "directory's name (its fingerprint)", json_schema_extra={"fingerprint": False})
    node_rank: NonNegativeInt = Field(0, description="this machine's place among the nnodes (0 = the first, at rdzv_endpoint, "
                                      "which holds rank 0 and commits the output; the others train their share and "
                                      "commit nothing)", json_schema_extra={"fingerprint": False})
    eval_every_steps: NonNegativeInt = Field(0, description="validate every this many steps too; 0 = only at epoch end")
    # How often to save and log changes how a run goes, not what it makes: not part of the stage fingerprint.
    checkpoint_every_steps: NonNegativeInt = Field(200, description="write last/ every this many steps; 0 = only at epoch end",
                                                   json_schema_extra={"fingerprint": False})
    num_threads: PositiveInt | None = Field(None, description="CPU threads for torch; None = this process's share of the cores it may "
                                            "use, divided among the trainings running on the machine", json_schema_extra={"fingerprint": False})
    log_every_steps: PositiveInt = Field(50, description="report mean loss and chars/s every this many steps", json_schema_extra={"fingerprint": False})
    early_stopping_patience: PositiveInt | None = Field(
        3, description="stop after this many validations in a row without a new best loss; None = never")
    seed: NonNegativeInt = Field(0, description="seeds weight init, dropout and the data order")
    max_val_windows: PositiveInt | None = Field(None, description="validate on this many evenly spaced val windows; None = all")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value != "auto":
            try:
                import torch  # only here: the config module stays importable without torch (data-stage processes)

                torch.device(value)
            except RuntimeError as exc:
                raise ValueError(f"not a torch device: {exc}") from None
        return value

    @field_validator("rdzv_endpoint")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value:
            host, sep, port = value.rpartition(":")
            if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
                raise ValueError(f"expected host:port (a port from 1 to 65535), got {value!r}")
        return value or None

    @model_validator(mode="wrap")
    @classmethod
    def _fields_together(cls, data, handler):
        """Checks of several fields together, reported with every other problem at once (pydantic runs an
        `after` validator only when all fields are valid, so this one wraps the field validation)."""
        try:
            cfg, errors = handler(data), []
        except ValidationError as exc:
            if not isinstance(data, dict):
                raise
            failed = {e["loc"][0] for e in exc.errors() if e["loc"]}
            cfg, errors = cls.model_construct(**{k: v for k, v in data.items() if k in cls.model_fields and k not in failed}), exc.errors()
            if not _together_problems(cfg):
                raise
        problems = _together_problems(cfg)
        if not problems:
            return cfg
        raise ValidationError.from_exception_data(cls.__name__, [*map(_line_error, errors), *(
            {"type": PydanticCustomError("fields_together", message), "loc": (name,), "input": getattr(cfg, name, None)}
            for name, message in problems)])

    @property
    def world_size(self) -> int:
        """How many processes train together: nproc_per_node × nnodes."""
        return self.nproc_per_node * self.nnodes


def _together_problems(cfg: "TrainConfig") -> list[tuple[str, str]]:
    """(field, message) for each check of several fields that fails; a field that is not a valid int is skipped."""
    def value(name: str):
        v = getattr(cfg, name, None)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    batch, nproc, nnodes = value("batch_size"), value("nproc_per_node"), value("nnodes")
    problems = []
    if batch and nproc and nnodes and batch % (nproc * nnodes):
        problems.append(("batch_size", f"batch_size {batch} is the global batch, and must be divisible by the world size "
                                       f"nproc_per_node × nnodes = {nproc} × {nnodes} = {nproc * nnodes}: each process "
                                       f"trains on an equal slice of it"))
    node_rank = getattr(cfg, "node_rank", 0)
    if nnodes and isinstance(node_rank, int) and node_rank >= nnodes:
        problems.append(("node_rank", f"node_rank {node_rank} must be below nnodes={nnodes} (0 is the first machine)"))
    if nnodes and nnodes > 1 and not getattr(cfg, "rdzv_endpoint", None):
        problems.append(("rdzv_endpoint", f"nnodes={nnodes} needs rdzv_endpoint: the host:port where the machines meet, "
                                          f"reachable from each of them"))
    device = getattr(cfg, "device", None)
    if nproc and nproc > 1 and isinstance(device, str) and device.startswith("cuda:"):
        problems.append(("device", f"device={device} names one GPU, but with nproc_per_node={nproc} each process takes "
                                   f"its own (cuda:LOCAL_RANK): use device=cuda or auto"))
    return problems


def _line_error(error: dict) -> dict:
    """A pydantic error (from ValidationError.errors()) as a line error to raise again."""
    detail = {"type": error["type"], "loc": error["loc"], "input": error["input"], **({"ctx": error["ctx"]} if "ctx" in error else {})}
    try:
        ValidationError.from_exception_data("check", [detail])
    except (KeyError, TypeError, ValueError):  # a custom error type: keep its message
        detail = {"type": PydanticCustomError(error["type"], error["msg"]), "loc": error["loc"], "input": error["input"]}
    return detail


class FinetuneTrainConfig(TrainConfig):
    """The published fine-tuning recipe as defaults: a fresh Adam at 1e-5 for the first 4
    epochs, then x exp(-0.1) per epoch, up to 50 epochs, early stopping.

    A class of its own, not a factory: a partial override (`--set`, a YAML file, a
    deployment's parameters, the UI's form) fills the fields it leaves out from these
    defaults, never from the pretraining recipe.
    """

    learning_rate: PositiveFloat = Field(1e-5, allow_inf_nan=False, description="Adam learning rate during the constant epochs (low: keep what pretraining learned)")
    constant_epochs: NonNegativeInt = Field(4, description="epochs at the full rate (0-based epochs 0 .. constant_epochs-1); each later epoch multiplies it by exp(-0.1)")
