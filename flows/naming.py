"""Flow run names that say what runs: stage, profile and key parameters.

A stage run that starts from its latest output's config (`start_from=latest`) is renamed once
that config is merged (rename_run_for), so its name shows the values it trains with, not the
defaults of the fields it was not given.
"""

from __future__ import annotations

import logging
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

    def name(params: dict | None = None) -> str:  # Prefect calls it with none: the run's own parameters
        params = (flow_run.parameters or {}) if params is None else params
        bits = [stage]
        for label, dotted in fields.items():
            value = _get(params, dotted)
            if value not in (None, ""):
                if isinstance(value, list):
                    value = "x".join(map(str, value))
                bits.append(f"{label}={value}")
        return " ".join(bits)

    name.homer_fields = fields  # marks the namers rename_run_for may call again
    return name


def rename_run_for(config: Any) -> str | None:
    """Rename the current flow run as its namer would with `config` in place of the given one; the new name, or None."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    namer = getattr(getattr(context, "flow", None), "flow_run_name", None)
    if context is None or context.flow_run is None or not hasattr(namer, "homer_fields"):
        return None
    # the run's parameters with their defaults, as the namer saw them (the API's flow run holds only those given)
    params = {**(context.parameters or {}), "config": config.model_dump(mode="json")}
    new = namer(params)
    if new == context.flow_run.name:
        return None
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            client.update_flow_run(context.flow_run.id, name=new)
    except Exception as exc:  # a name is no reason to fail the run
        logging.getLogger("homer").warning("could not rename the run to %r: %s", new, exc)
        return None
    return new
