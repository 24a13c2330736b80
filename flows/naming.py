"""Flow run names that say what runs: stage, profile and key parameters."""

from __future__ import annotations

from typing import Any, Callable

from prefect.runtime import flow_run


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if obj is None:
            return None
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
    return obj


def run_namer(stage: str, fields: dict[str, str]) -> Callable[[], str]:
    """A flow_run_name callable: '<stage> key=value ...' from the run's parameters."""

    def name() -> str:
        params = flow_run.parameters or {}
        bits = [stage]
        for label, dotted in fields.items():
            value = _get(params, dotted)
            if value not in (None, ""):
                if isinstance(value, list):
                    value = "x".join(map(str, value))
                bits.append(f"{label}={value}")
        return " ".join(bits)

    return name
