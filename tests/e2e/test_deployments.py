"""prefect.yaml and `homer serve` (flows/serve.py) describe the same deployments, and
prefect.yaml puts each on the work pool the stage registry names (tasks/stages.py: training
on `homer-gpu`, the rest on `homer-pool`; serve has no pools).

No server needed: the YAML is read as data, serve's deployments are built with
`flow.to_deployment` but not applied, and each entrypoint is loaded the way a worker
loads it (from the repository root, by file path).
"""

from __future__ import annotations

import inspect
import zoneinfo
from pathlib import Path

import pytest
import yaml

from flows.config import PROFILES, PipelineConfig, load_config
from flows.sweep import DEPLOYMENTS as SWEEPS
from tasks.stages import DATA_POOL, GPU_POOL, STAGES

REPO = Path(__file__).resolve().parents[2]
STAGE_DEPLOYMENTS = [*STAGES, "generate"]
SWEEP_DEPLOYMENTS = list(SWEEPS)  # the sweep and its trials: flows/sweep.py names them and their pools


def prefect_yaml() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text(encoding="utf-8"))


def by_name(deployments) -> dict:
    return {d["name"]: d for d in deployments}


def module_path(entrypoint: str) -> str:
    """flows/prepare.py:prepare -> flows.prepare.prepare"""
    path, function = entrypoint.split(":")
    return f"{path.removesuffix('.py').replace('/', '.')}.{function}"


def squash(text: str | None) -> str | None:
    return " ".join(text.split()) if text else None


def expected_pool(name: str) -> str:
    """The registry's pool for a stage deployment (flows/sweep.py's for the sweep's); the pipeline and generate run on the data pool."""
    return STAGES[name].pool if name in STAGES else SWEEPS[name]["pool"] if name in SWEEPS else DATA_POOL


def test_prefect_yaml_has_every_deployment_on_the_registrys_pool():
    doc = prefect_yaml()
    deployments = by_name(doc["deployments"])
    assert sorted(deployments) == sorted(["scheduled", "sample", *STAGE_DEPLOYMENTS, *SWEEP_DEPLOYMENTS])
    pools = {name: d["work_pool"]["name"] for name, d in deployments.items()}
    assert pools == {name: expected_pool(name) for name in deployments}
    assert {name for name, pool in pools.items() if pool == GPU_POOL} == {"pretrain", "finetune", "sweep-trial"}
    for name, d in deployments.items():
        assert d["enforce_parameter_schema"] is True, name
        assert d["work_pool"]["job_variables"] == {}, f"{name}: a process pool takes no image or GPU settings"
    # the working directory of every flow run is the checkout `prefect deploy` ran in
    (build,) = doc["build"]
    assert build["prefect.deployments.steps.run_shell_script"] == {"id": "checkout", "script": "pwd", "stream_output": False}
    (pull,) = doc["pull"]
    assert pull == {"prefect.deployments.steps.set_working_directory": {"directory": "{{ checkout.stdout }}"}}


def test_schedule_is_weekly_cron_with_an_explicit_time_zone():
    deployments = by_name(prefect_yaml()["deployments"])
    (schedule,) = deployments["scheduled"]["schedules"]
    assert schedule == {"cron": "0 3 * * 1", "timezone": "UTC", "active": True}
    assert schedule["timezone"] in zoneinfo.available_timezones()
    assert deployments["scheduled"]["parameters"] == {}  # the published recipe: every default
    assert all(not d["schedules"] for name, d in deployments.items() if name != "scheduled")


def test_sample_deployment_holds_only_the_sample_profile_overrides():
    params = by_name(prefect_yaml()["deployments"])["sample"]["parameters"]
    assert params == {"config": {**PROFILES["sample"], "profile": "sample"}}
    assert PipelineConfig.model_validate(params["config"]) == load_config("sample")


def test_yaml_and_serve_agree_on_names_schedules_parameters_tags_descriptions():
    from flows.serve import build_deployments, deployment_specs

    yaml_deployments = by_name(prefect_yaml()["deployments"])
    specs = by_name(deployment_specs())
    assert sorted(specs) == sorted(yaml_deployments)
    for name, d in yaml_deployments.items():
        spec = specs[name]
        assert module_path(d["entrypoint"]) == spec["entrypoint"], name
        assert d["schedules"] == spec["schedules"], name
        assert d["parameters"] == spec["parameters"], name
        assert d["tags"] == spec["tags"], name
        assert squash(d.get("description")) == squash(spec["description"]), name

    built = by_name([{"name": dep.name, "dep": dep} for dep in build_deployments()])
    assert sorted(built) == sorted(yaml_deployments)
    for name, d in yaml_deployments.items():
        dep = built[name]["dep"]
        assert dep.enforce_parameter_schema is True
        assert dep.parameters == d["parameters"]
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in dep.schedules or []] == \
            [(s["cron"], s["timezone"], s["active"]) for s in d["schedules"]]


def test_serve_stores_only_what_the_given_config_changes():
    from flows.serve import build_deployments

    deployments = {d.name: d for d in build_deployments(load_config("sample", sets=["prepare.seq_len=50"]), cron="30 2 * * *")}
    assert deployments["prepare"].parameters == {"config": {"lines_per_doc": 10, "seq_len": 50}}
    assert deployments["ingest-wikipedia"].parameters == {"config": {"source": "sample"}}
    assert deployments["generate"].parameters == {}
    assert PipelineConfig.model_validate(deployments["scheduled"].parameters["config"]) == \
        load_config("sample", sets=["prepare.seq_len=50"])
    (schedule,) = deployments["scheduled"].schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("30 2 * * *", "UTC")
    assert "30 2 * * *" in deployments["scheduled"].description


@pytest.mark.parametrize("name", ["scheduled", *STAGE_DEPLOYMENTS, *SWEEP_DEPLOYMENTS])
def test_entrypoint_loads_from_the_repo_root_with_a_typed_documented_form(name, monkeypatch):
    """The worker's view: the file-path entrypoint loads (no module shadows `model`/`tasks`),
    and the run form shows every config field with its description, starting from the defaults."""
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    from flows.serve import deployment_specs

    monkeypatch.chdir(REPO)
    entrypoint = by_name(prefect_yaml()["deployments"])[name]["entrypoint"]
    flow = load_flow_from_entrypoint(entrypoint)
    assert flow.name == by_name(deployment_specs())[name]["flow"].name
    schema = parameter_schema(flow).model_dump_for_openapi()
    assert "config" in schema["properties"] and "data_dir" in schema["properties"]
    config = schema["properties"]["config"]
    assert "$ref" in config, "the config parameter should be a typed model, not a free-form dict"
    # the form starts from the whole default config, nested defaults included (finetune's 1e-5, the layer sizes)
    assert config["default"] == inspect.signature(flow.fn).parameters["config"].default.model_dump(mode="json")
    for model_name, model in schema["definitions"].items():
        if model_name == "StageRef":
            continue
        for field, spec in model["properties"].items():
            assert spec.get("description"), f"{model_name}.{field} has no description for the run form"


def test_readme_deployments_table_is_the_stage_registry():
    """The docs table is made from the stage registry: a new stage must appear in it, as `homer stages` prints it."""
    from tasks.stages import deployments_table

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    rows = deployments_table().splitlines()[2:]
    table = readme[readme.index(deployments_table().splitlines()[0]):]
    table = table[:table.index("\n\n")].splitlines()
    assert [line for line in table if line.startswith("| `") and "homer-pipeline" not in line and "generate/" not in line] == rows
    # the rows the registry does not make: the whole pipeline and generate, on the data pool as in prefect.yaml
    others = [line for line in table if "homer-pipeline/" in line or "generate/" in line]
    assert len(others) == 3 and all(line.endswith(f"| `{DATA_POOL}` |") for line in others), others
