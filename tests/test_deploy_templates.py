"""The container and Kubernetes variants in deploy/ agree with prefect.yaml, the stage registry and Prefect.

- deploy/prefect-docker.yaml has prefect.yaml's deployments (names, entrypoints, parameters,
  tags, schedules), on the `docker` twins of the registry's pools, and each deployment's image
  job variable is what its pool's build step makes (rendered with Prefect's own templating).
- deploy/Dockerfile and .dockerignore: the pull step's directory is the image's WORKDIR, every
  install uses the tested pins, and the build context holds what the image needs and nothing
  generated or private.
- deploy/kubernetes/homer-gpu-job-template.json renders (as a worker renders it) to a Job whose
  container has the nvidia.com/gpu limit and the image, and a real Prefect server takes it as a
  `kubernetes` work pool's base job template and enforces its variables.

No container engine or cluster runs here: the files are checked as data and against Prefect.

    python -m pytest tests/test_deploy_templates.py -q
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tasks.stages import DATA_POOL, GPU_POOL, STAGES

REPO = Path(__file__).resolve().parent.parent
DOCKER_YAML = REPO / "deploy" / "prefect-docker.yaml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
K8S_TEMPLATE = REPO / "deploy" / "kubernetes" / "homer-gpu-job-template.json"
BUILD_STEP = "prefect_docker.deployments.steps.build_docker_image"
PUSH_STEP = "prefect_docker.deployments.steps.push_docker_image"


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def by_name(doc: dict) -> dict[str, dict]:
    return {d["name"]: d for d in doc["deployments"]}


def steps(doc: dict, section: str, fqn: str) -> list[dict]:
    return [step[fqn] for step in doc.get(section) or [] if fqn in step]


def registry_pool(name: str) -> str:
    """The stage registry's pool for a deployment (flows/sweep.py's for the sweep's); the pipeline and generate run on the data pool."""
    from flows.sweep import DEPLOYMENTS as SWEEPS

    return STAGES[name].pool if name in STAGES else SWEEPS[name]["pool"] if name in SWEEPS else DATA_POOL


# ---- deploy/prefect-docker.yaml ------------------------------------------------------------

def test_both_files_are_valid_prefect_deploy_files():
    """What `prefect deploy` itself validates (its pydantic model of prefect.yaml): nothing is skipped."""
    from prefect.cli.deploy._models import PrefectYamlModel

    for path in (REPO / "prefect.yaml", DOCKER_YAML):
        raw = load_yaml(path)
        model = PrefectYamlModel.model_validate(raw)
        assert [d.name for d in model.deployments] == [d["name"] for d in raw["deployments"]], path
        assert all(d.entrypoint and d.work_pool and d.work_pool.name for d in model.deployments), path


def test_docker_file_has_the_deployments_of_prefect_yaml():
    """Same names, entrypoints, parameters, tags, schedules and descriptions; only the pools (and images) differ."""
    plain, docker = by_name(load_yaml(REPO / "prefect.yaml")), by_name(load_yaml(DOCKER_YAML))
    assert list(docker) == list(plain)
    for name, d in plain.items():
        other = docker[name]
        for key in ("entrypoint", "parameters", "tags", "schedules", "description", "enforce_parameter_schema"):
            assert other.get(key) == d.get(key), f"{name}: {key} differs between prefect.yaml and {DOCKER_YAML.name}"
        assert set(other) == set(d), name
    pools = {name: d["work_pool"]["name"] for name, d in docker.items()}
    assert pools == {name: f"{registry_pool(name)}-docker" for name in docker}
    assert {name for name, pool in pools.items() if pool == f"{GPU_POOL}-docker"} == {"pretrain", "finetune", "sweep-trial"}


def test_each_pool_runs_the_image_its_build_step_makes():
    """The image job variable names a build step's output; rendered with the outputs prefect-docker returns,
    the deployments get exactly the image that step built and the push steps pushed."""
    from prefect.utilities.templating import apply_values

    doc = load_yaml(DOCKER_YAML)
    builds = {step["id"]: step for step in steps(doc, "build", BUILD_STEP)}
    assert set(builds) == {"build-image", "build-gpu-image"}
    # prefect-docker's BuildDockerImageResult for each step (the tag is a timestamp when none is given)
    outputs = {sid: {"image_name": step["image_name"], "tag": f"2026-12-02t10-00-00-{i}",
                     "image": f"{step['image_name']}:2026-12-02t10-00-00-{i}", "image_id": f"sha256:{i:064d}",
                     "additional_tags": []}
               for i, (sid, step) in enumerate(builds.items())}
    for sid, step in builds.items():
        assert "tag" not in step, f"{sid}: a fixed tag would let workers run a stale image"
        assert (REPO / step["dockerfile"]).resolve() == DOCKERFILE

    pushed = [apply_values(push, outputs) for push in steps(doc, "push", PUSH_STEP)]
    assert sorted((p["image_name"], p["tag"]) for p in pushed) == sorted((o["image_name"], o["tag"]) for o in outputs.values())

    expected_build = {f"{DATA_POOL}-docker": "build-image", f"{GPU_POOL}-docker": "build-gpu-image"}
    for name, d in by_name(doc).items():
        pool = d["work_pool"]["name"]
        image = d["work_pool"]["job_variables"]["image"]
        assert image == "{{ " + expected_build[pool] + ".image }}", name
        rendered = apply_values(copy.deepcopy(d), outputs, warn_on_notset=True, skip_prefixes=["ctx."])
        assert rendered["work_pool"]["job_variables"]["image"] == outputs[expected_build[pool]]["image"], name
        assert "{{" not in json.dumps(rendered), f"{name}: a placeholder no step fills"


def test_training_containers_request_a_gpu_and_data_containers_do_not():
    """docker-py, the client the Docker worker hands container_create_kwargs to, accepts the GPU request."""
    from docker.types import DeviceRequest, HostConfig

    for name, d in by_name(load_yaml(DOCKER_YAML)).items():
        variables = d["work_pool"]["job_variables"]
        assert variables["volumes"] == ["homer-data:/data"], name  # HOMER_DATA_DIR=/data in the image
        kwargs = variables.get("container_create_kwargs") or {}
        if registry_pool(name) == GPU_POOL:
            (request,) = kwargs["device_requests"]
            device = DeviceRequest(**request)
            assert device.driver == "nvidia" and device.count == 1 and device.capabilities == [["gpu"]], name
            host = HostConfig(version="1.44", device_requests=kwargs["device_requests"], shm_size=kwargs["shm_size"])
            assert host["DeviceRequests"][0]["Capabilities"] == [["gpu"]] and host["ShmSize"] == 2 * 1024**3
        else:
            assert "device_requests" not in kwargs, f"{name} runs on the CPU pool"


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(encoding="utf-8"), re.MULTILINE))


def test_dockerfile_installs_the_tested_pins_and_the_pull_step_is_its_workdir():
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert text.startswith("# "), "the Dockerfile opens with what it is and how to build it"
    (pull,) = load_yaml(DOCKER_YAML)["pull"]
    workdirs = re.findall(r"^WORKDIR (\S+)$", text, re.MULTILINE)
    assert pull == {"prefect.deployments.steps.set_working_directory": {"directory": workdirs[-1]}}
    installs = [line for line in re.sub(r"\\\n", " ", text).splitlines() if "pip install" in line]
    assert len(installs) == 2 and all("-c constraints.txt" in line for line in installs), installs
    assert all('--extra-index-url "${TORCH_INDEX}"' in line for line in installs)
    args = dockerfile_args()
    assert args["BASE_IMAGE"].startswith("python:3.11") and args["TORCH_INDEX"].endswith("/whl/cpu")
    # the GPU build changes only what the Dockerfile declares as build arguments: torch's index
    gpu = [s for s in steps(load_yaml(DOCKER_YAML), "build", BUILD_STEP) if s["id"] == "build-gpu-image"][0]
    assert set(gpu["buildargs"]) <= set(args) and re.search(r"/whl/cu\d+$", gpu["buildargs"]["TORCH_INDEX"])
    assert "buildargs" not in [s for s in steps(load_yaml(DOCKER_YAML), "build", BUILD_STEP) if s["id"] == "build-image"][0]


# ---- .dockerignore: Docker's rules (moby's patternmatcher): the last matching pattern wins, `!`
# ---- re-includes, `*` stays within a path segment, `**` spans segments, a directory takes its contents

def docker_pattern(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negate, docker_pattern(pattern)))
    return rules


def ignored(path: str, rules) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for negate, rx in rules:
        if any(rx.match(c) for c in candidates):
            result = not negate
    return result


def test_the_build_context_holds_the_project_and_nothing_generated():
    assert DOCKERIGNORE.read_text(encoding="utf-8").startswith("# ")
    rules = dockerignore_rules()
    needed = ["pyproject.toml", "constraints.txt", "README.md", "prefect.yaml", "deploy/Dockerfile",
              "data/sample/README.md"]
    for package in ("flows", "tasks", "model"):
        needed += [str(p.relative_to(REPO)) for p in (REPO / package).rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts]
    assert any(p.startswith("model/sample_data/") for p in needed), "the bundled sample data ships in the image"
    assert [p for p in needed if ignored(p, rules)] == []
    left_out = [".venv/bin/python", ".venv/lib/python3.11/site-packages/torch/__init__.py", ".git/config",
                "data/prepare/07c958d1dd9dca40/manifest.json", "data/pretrain/latest", "data/README.md",
                "flows/__pycache__/cli.cpython-311.pyc", "model/network/__pycache__/rnn.cpython-311.pyc",
                "tests/conftest.py", "recurrent_homer.egg-info/PKG-INFO", ".env", "benchmarks/bench_train.py",
                "docs/flow-run.png", ".pytest_cache/v/cache/lastfailed"]
    assert [p for p in left_out if not ignored(p, rules)] == []


# ---- deploy/kubernetes/homer-gpu-job-template.json ----------------------------------------

def k8s_template() -> dict:
    return json.loads(K8S_TEMPLATE.read_text(encoding="utf-8"))


def render(template: dict, job_variables: dict) -> dict:
    """What BaseJobConfiguration.from_template_and_values does with a work pool's template and a
    deployment's job variables, before blocks and Prefect variables: the variables' defaults,
    overridden by the job variables, substituted into job_configuration; an unset placeholder drops its key."""
    from prefect.utilities.templating import apply_values
    from prefect.workers.base import BaseJobConfiguration

    values = BaseJobConfiguration._get_base_config_defaults(template["variables"]["properties"])
    values.update(job_variables)
    return apply_values(copy.deepcopy(template["job_configuration"]), values)


def container(configuration: dict) -> dict:
    (only,) = configuration["job_manifest"]["spec"]["template"]["spec"]["containers"]
    return only


def bundled_kubernetes_template() -> dict:
    """prefect-kubernetes' default base job template as this Prefect release knows it (its offline copy
    of the collection registry, what `prefect work-pool create --type kubernetes` starts from)."""
    import prefect.server.api

    views = Path(prefect.server.api.__file__).parent / "collections_data" / "views" / "aggregate-worker-metadata.json"
    return json.loads(views.read_text())["prefect-kubernetes"]["kubernetes"]["default_base_job_configuration"]


def test_k8s_template_has_the_kubernetes_workers_shape():
    from prefect.utilities.templating import find_placeholders

    template, default = k8s_template(), bundled_kubernetes_template()
    assert set(template) == {"job_configuration", "variables"}
    assert template["variables"]["description"].startswith("recurrent-homer's Kubernetes base job template")
    # the worker's own settings all stay templated, so the worker and the UI treat it as its default
    assert set(default["job_configuration"]) <= set(template["job_configuration"])
    assert set(default["variables"]["properties"]) <= set(template["variables"]["properties"])
    # every placeholder has a variable (the server refuses a template otherwise)
    names = {p.name for p in find_placeholders(template["job_configuration"])}
    assert names <= set(template["variables"]["properties"]), names - set(template["variables"]["properties"])
    # what prefect-kubernetes' job manifest validators require of a Job
    manifest = template["job_configuration"]["job_manifest"]
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    pod = manifest["spec"]["template"]["spec"]
    assert (pod["parallelism"], pod["completions"], pod["restartPolicy"]) == (1, 1, "Never")
    assert [c["name"] for c in pod["containers"]] == ["prefect-job"]
    assert template["variables"]["required"] == ["image"]


def test_k8s_template_renders_a_job_with_the_gpu_limit_and_the_image():
    image = "registry.example.com/homer/recurrent-homer-cuda:2026-12-02"
    job = render(k8s_template(), {"image": image, "env": {"HOMER_DATA_DIR": "s3://homer/artifacts"}})
    manifest = job["job_manifest"]
    c = container(job)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1  # the default: one GPU, an integer quantity
    assert c["image"] == image and c["imagePullPolicy"] == "IfNotPresent"
    assert c["env"] == {"HOMER_DATA_DIR": "s3://homer/artifacts"}  # the worker turns it into name/value pairs
    assert c["resources"]["requests"] == {"cpu": "4", "memory": "16Gi"}
    assert "cpu" not in c["resources"]["limits"] and "memory" not in c["resources"]["limits"]  # unset: dropped
    assert job["namespace"] == manifest["metadata"]["namespace"] == "default"
    pod = manifest["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "serviceAccountName" not in pod
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    assert c["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    assert manifest["spec"]["backoffLimit"] == 0 and manifest["spec"]["ttlSecondsAfterFinished"] == 86400
    assert re.findall(r"{{[^}]*}}", json.dumps(job)) == [], "every placeholder is filled or dropped"
    assert manifest["metadata"]["generateName"] == "-"  # no name yet: the worker names the Job after the flow run

    two = render(k8s_template(), {"image": image, "gpu_count": 2, "namespace": "homer",
                                  "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H200"}, "memory_limit": "64Gi"})
    c2 = container(two)
    assert c2["resources"]["limits"] == {"nvidia.com/gpu": 2, "memory": "64Gi"}
    assert two["job_manifest"]["metadata"]["namespace"] == "homer"
    assert two["job_manifest"]["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}


def prefect_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_k8s_template_registers_on_a_prefect_server_and_its_variables_are_enforced(prefect_harness):
    """A real server (no prefect-kubernetes installed) takes the template as a `kubernetes` pool's, created with
    the CLI; a deployment on it gets its GPU count checked, a flow run without an image is refused, and the worker's
    own rendering (from_template_and_values, blocks and Prefect variables resolved) gives the GPU Job."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL
    from prefect.workers.base import BaseJobConfiguration

    class KubernetesLikeConfiguration(BaseJobConfiguration):  # the fields prefect-kubernetes' configuration adds
        namespace: str = "default"
        job_manifest: dict
        cluster_config: dict | None = None
        job_watch_timeout_seconds: int | None = None
        pod_watch_timeout_seconds: int = 60
        stream_output: bool = True

    pool = f"homer-gpu-k8s-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_CLI_PROMPT": "false"}
    created = prefect_cli("work-pool", "create", pool, "--type", "kubernetes", "--base-job-template", str(K8S_TEMPLATE), env=env)
    assert created.returncode == 0, created.stdout + created.stderr
    image = "registry.example.com/homer/recurrent-homer-cuda:2026-12-02"

    async def check():
        async with get_client() as client:
            try:
                work_pool = await client.read_work_pool(pool)
                assert work_pool.type == "kubernetes"
                assert work_pool.base_job_template == k8s_template()
                flow_id = await client.create_flow_from_name("homer-k8s-template-check")

                async def deployment(name: str, job_variables: dict):
                    return await client.create_deployment(flow_id=flow_id, name=name, work_pool_name=pool,
                                                          entrypoint="flows/pretrain.py:pretrain", job_variables=job_variables)

                with pytest.raises(PrefectHTTPStatusError) as refused:  # checked against the pool's variables
                    await deployment("zero-gpus", {"image": image, "gpu_count": 0})
                assert refused.value.response.status_code == 422 and "gpu_count" in refused.value.response.text

                no_image = await deployment("no-image", {"gpu_count": 2})
                with pytest.raises(PrefectHTTPStatusError) as refused:  # `image` is required by the time a run is made
                    await client.create_flow_run_from_deployment(no_image)
                assert refused.value.response.status_code == 422 and "image" in refused.value.response.text

                two = await deployment("two-gpus", {"image": image, "gpu_count": 2})
                run = await client.create_flow_run_from_deployment(two)
                read = await client.read_deployment(two)
                configuration = await KubernetesLikeConfiguration.from_template_and_values(
                    work_pool.base_job_template, {**read.job_variables, **(run.job_variables or {})}, client=client)
                return configuration, read.job_variables
            finally:
                await client.delete_work_pool(pool)

    configuration, job_variables = anyio.run(check)
    c = container(configuration.model_dump())
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2 and c["image"] == image
    # the worker's rendering and this file's render() agree
    assert configuration.job_manifest == render(k8s_template(), job_variables)["job_manifest"]
