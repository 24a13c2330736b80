"""`homer serve`: every deployment of prefect.yaml, served from this one process.

For a single machine without a work pool or worker: this process registers the
deployments with the Prefect server (PREFECT_API_URL), polls for their runs and runs
each in a subprocess; Ctrl-C stops it (and pauses the schedule).

    homer serve                          # the published recipe, weekly
    homer serve --profile sample         # every deployment on the bundled sample data
    homer serve --cron "30 2 * * *"      # the full pipeline daily at 02:30 UTC instead

The deployments have the same names, schedule and parameters as prefect.yaml (checked
by tests/e2e/test_deployments.py). The config given to `homer serve` becomes the
deployments' parameters: only the fields that differ from the defaults are stored, so
with the default profile every run form starts from the published recipe, exactly as
after `prefect deploy --all`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from flows.config import PROFILES, PipelineConfig, deep_merge, overrides
from tasks.stages import STAGES

WEEKLY_CRON = "0 3 * * 1"  # minute hour day-of-month month day-of-week: Mondays at 03:00
TIMEZONE = "UTC"

SCHEDULED_DESCRIPTION = ("The whole pipeline on the published recipe (Wikipedia from the Hugging Face hub, the Simpsons "
                         "dialogue from Kaggle), every Monday at 03:00 UTC.")
SAMPLE_DESCRIPTION = ("The whole pipeline on the bundled sample data with a small model (the `sample` profile): offline, "
                      "a few minutes on a CPU.")

# Deployments besides one per stage of tasks.stages.STAGES: generate makes samples, not a stage output.
GENERATE = {"name": "generate", "entrypoint": "flows.generate.generate_flow", "tags": ["homer", "stage"]}


def _config_parameters(value: BaseModel | dict, default: BaseModel | dict) -> dict[str, Any]:
    diff = overrides(value, default)
    return {"config": diff} if diff else {}


def sample_parameters() -> dict[str, Any]:
    """The `sample` pipeline deployment's parameters: the profile's overrides only."""
    return {"config": deep_merge(PROFILES["sample"], {"profile": "sample"})}


def scheduled_description(config: PipelineConfig, cron: str | None) -> str:
    """prefect.yaml's description, unless `homer serve` was given another config or schedule."""
    if not overrides(config, PipelineConfig()) and cron in (None, WEEKLY_CRON):
        return SCHEDULED_DESCRIPTION
    what = ("the published recipe" if not overrides(config, PipelineConfig())
            else f"the config given to `homer serve` (profile {config.profile}; the parameters hold its changed fields)")
    when = "every Monday at 03:00 UTC" if cron in (None, WEEKLY_CRON) else f"on the cron schedule `{cron}` ({TIMEZONE})"
    return f"The whole pipeline on {what}, {when}."


def deployment_specs(config: PipelineConfig | None = None, cron: str | None = None) -> list[dict[str, Any]]:
    """Every deployment as plain data: flow, entrypoint, name, parameters, schedules, tags, description."""
    import importlib

    config, defaults = config or PipelineConfig(), PipelineConfig()
    pipeline = {"flow": importlib.import_module("flows.pipeline").homer_pipeline, "entrypoint": "flows.pipeline.homer_pipeline"}
    specs = [
        {**pipeline, "name": "scheduled", "description": scheduled_description(config, cron), "tags": ["homer", "pipeline"],
         "parameters": _config_parameters(config, defaults),
         "schedules": [{"cron": cron or WEEKLY_CRON, "timezone": TIMEZONE, "active": True}]},
        {**pipeline, "name": "sample", "description": SAMPLE_DESCRIPTION, "tags": ["homer", "pipeline", "sample"],
         "parameters": sample_parameters(), "schedules": []},
    ]
    for stage in STAGES.values():
        parameters = _config_parameters(getattr(config, stage.section), getattr(defaults, stage.section))
        specs.append({"flow": stage.load_flow(), "entrypoint": stage.entrypoint, "name": stage.name, "description": None,
                      "tags": stage.tags, "parameters": parameters, "schedules": []})
    module, _, function = GENERATE["entrypoint"].rpartition(".")
    specs.append({"flow": getattr(importlib.import_module(module), function), "entrypoint": GENERATE["entrypoint"],
                  "name": GENERATE["name"], "description": None, "tags": GENERATE["tags"], "parameters": {}, "schedules": []})
    from flows.sweep import DEPLOYMENTS as SWEEP_DEPLOYMENTS  # the sweep and its trials (flows/sweep.py)

    for name, sweep in SWEEP_DEPLOYMENTS.items():
        module, _, function = sweep["entrypoint"].rpartition(".")
        specs.append({"flow": getattr(importlib.import_module(module), function), "entrypoint": sweep["entrypoint"], "name": name,
                      "description": sweep["description"], "tags": sweep["tags"], "schedules": [],
                      "parameters": _config_parameters(config, defaults) if name == "sweep" else {}})  # a trial's config comes with it
    return specs


def build_deployments(config: PipelineConfig | None = None, cron: str | None = None) -> list:
    """RunnerDeployments for `prefect.serve`, made with `flow.to_deployment`."""
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    deployments = []
    for spec in deployment_specs(config, cron):
        schedules = [Cron(s["cron"], timezone=s["timezone"], active=s["active"]) for s in spec["schedules"]]
        deployments.append(spec["flow"].to_deployment(
            name=spec["name"], parameters=spec["parameters"], schedules=schedules or None, tags=spec["tags"],
            description=spec["description"], enforce_parameter_schema=True,
            entrypoint_type=EntrypointType.MODULE_PATH,  # importable from any directory (the package is installed)
        ))
    return deployments


def serve_all(config: PipelineConfig, cron: str | None = None) -> None:
    """Serve every deployment from this process until interrupted (no work pool needed)."""
    from prefect import serve

    serve(*build_deployments(config, cron))
