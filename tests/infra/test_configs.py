"""Static checks of infra/: configs parse, carry the keys their tools need, and pin the versions
that pyproject.toml allows."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO_ROOT = Path(__file__).resolve().parents[2]
INFRA = REPO_ROOT / "infra"
LAUNCHER = INFRA / "ray" / "cluster-aws-gpu.yaml"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
KUBERAY_DOCKERFILE = INFRA / "kuberay" / "Dockerfile"
COMPOSE = INFRA / "mlflow" / "docker-compose.yaml"
MLFLOW_DOCKERFILE = INFRA / "mlflow" / "Dockerfile"
ENV_EXAMPLE = INFRA / "mlflow" / ".env.example"

RAY_IMAGE_RE = re.compile(r"rayproject/ray:(?P<version>\d+\.\d+\.\d+)-py(?P<py>3\d+)-(?P<platform>gpu|cpu|cu\d+)")
RAY_PIN_RE = re.compile(r"ray\[default\]==(?P<version>\d+\.\d+\.\d+)")
GPU = "nvidia.com/gpu"


def load_yaml(path: Path) -> dict[str, Any]:
    with open(path) as fh:
        data = yaml.safe_load(fh)
    assert isinstance(data, dict), f"{path}: top level must be a mapping"
    return data


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def requirement(name: str) -> Requirement:
    """The dependency ``name`` of pyproject.toml's [project].dependencies."""
    for line in pyproject()["project"]["dependencies"]:
        req = Requirement(line)
        if canonicalize_name(req.name) == canonicalize_name(name):
            return req
    raise KeyError(f"{name} is not a dependency in pyproject.toml")


def floor(req: Requirement) -> Version:
    """The lowest version ``req`` admits, from its ``>=``/``==`` clause."""
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert floors, f"{req} has no lower bound; infra pins need one to follow"
    return max(floors)


def env_list_to_dict(env: list[dict[str, str]]) -> dict[str, str]:
    return {item["name"]: item.get("value", "") for item in env}


def k8s_containers(raycluster: dict[str, Any]) -> list[dict[str, Any]]:
    spec = raycluster["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


# --- every file -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml")), ids=lambda p: str(p.relative_to(INFRA))
)
def test_yaml_parses_to_a_mapping(path: Path) -> None:
    assert load_yaml(path)


@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.sh")), ids=lambda p: str(p.relative_to(INFRA)))
def test_shell_script_parses(path: Path) -> None:
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    if path.name != "session.sh":  # sourced, not run
        assert path.stat().st_mode & 0o111, f"{path} is not executable"
        assert path.read_text().startswith("#!/usr/bin/env bash\n")


# --- Ray cluster launcher ---------------------------------------------------------------------


def test_launcher_config_matches_ray_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    ray_autoscaler = pytest.importorskip("ray.autoscaler")
    schema_path = Path(ray_autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(load_yaml(LAUNCHER), json.loads(schema_path.read_text()))


def test_launcher_node_types() -> None:
    cfg = load_yaml(LAUNCHER)
    assert cfg["cluster_name"] == "recast-gpu"
    assert cfg["provider"]["type"] == "aws"
    node_types = cfg["available_node_types"]
    head = node_types[cfg["head_node_type"]]
    assert head["resources"]["GPU"] == 0
    assert head["resources"]["CPU"] > 0

    gpu_types = {name: t for name, t in node_types.items() if t["resources"].get("GPU", 0) > 0}
    assert list(gpu_types) == ["worker.gpu"]
    worker = gpu_types["worker.gpu"]
    assert worker["resources"] == {"CPU": 4, "GPU": 1}  # g5.xlarge: 4 vCPU, 1x A10G
    assert worker["node_config"]["InstanceType"] == "g5.xlarge"
    assert (worker["min_workers"], worker["max_workers"]) == (0, 8)
    assert cfg["max_workers"] == 8
    assert sum(t.get("min_workers", 0) for t in node_types.values()) <= cfg["max_workers"]


def test_launcher_syncs_and_installs_the_project() -> None:
    cfg = load_yaml(LAUNCHER)
    assert cfg["file_mounts"] == {"~/recast": "."}
    assert ".gitignore" in cfg["rsync_filter"]
    assert any(re.search(r"pip install .*-e ~/recast\b", c) for c in cfg["setup_commands"])

    run_env = dict(
        opt.removeprefix("--env ").split("=", 1) for opt in cfg["docker"]["run_options"] if opt.startswith("--env ")
    )
    assert re.fullmatch(r"https?://[\w.-]+:\d+", run_env["MLFLOW_TRACKING_URI"])
    assert run_env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert run_env["MLFLOW_DISABLE_TELEMETRY"] == "true"


def test_launcher_workers_join_the_head_port() -> None:
    cfg = load_yaml(LAUNCHER)
    head_start = " ".join(cfg["head_start_ray_commands"])
    worker_start = " ".join(cfg["worker_start_ray_commands"])
    assert "--head" in head_start
    port = re.search(r"--port=(\d+)", head_start).group(1)
    assert f"--address=$RAY_HEAD_IP:{port}" in worker_start
    for cmd in (head_start, worker_start):
        assert "--disable-usage-stats" in cmd


# --- KubeRay ----------------------------------------------------------------------------------


def test_raycluster_structure() -> None:
    rc = load_yaml(RAYCLUSTER)
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["kind"] == "RayCluster"
    assert rc["metadata"]["name"] == "recast-gpu"
    spec = rc["spec"]
    assert isinstance(spec["rayVersion"], str)
    head = spec["headGroupSpec"]
    # rayStartParams is map[string]string in the CRD: a bare YAML number or bool is rejected.
    for group in [head, *spec["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        assert group["template"]["spec"]["containers"]
    assert GPU not in head["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_raycluster_gpu_worker_group() -> None:
    groups = load_yaml(RAYCLUSTER)["spec"]["workerGroupSpecs"]
    gpu_groups = [g for g in groups if GPU in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert [g["groupName"] for g in gpu_groups] == ["gpu"]
    group = gpu_groups[0]
    assert group["minReplicas"] == 0 <= group["replicas"] <= group["maxReplicas"] == 8
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"][GPU] == 1
    # Extended resources cannot be overcommitted: a request, if any, must equal the limit.
    assert resources["requests"].get(GPU, 1) == 1


def test_raycluster_containers_point_at_mlflow() -> None:
    for container in k8s_containers(load_yaml(RAYCLUSTER)):
        env = env_list_to_dict(container["env"])
        assert re.fullmatch(r"https?://[\w.-]+:\d+", env["MLFLOW_TRACKING_URI"]), container["name"]
        assert env["RAY_USAGE_STATS_ENABLED"] == "0"
        assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"


# --- versions against pyproject.toml ----------------------------------------------------------


def ray_pins() -> dict[str, str]:
    """Every place infra/ pins a Ray version, by where it is."""
    launcher = load_yaml(LAUNCHER)
    rc = load_yaml(RAYCLUSTER)
    pins = {
        "launcher docker.image": RAY_IMAGE_RE.fullmatch(launcher["docker"]["image"])["version"],
        "kuberay spec.rayVersion": rc["spec"]["rayVersion"],
    }
    for i, command in enumerate(launcher["setup_commands"]):
        if m := RAY_PIN_RE.search(command):
            pins[f"launcher setup_commands[{i}]"] = m["version"]
    for container in k8s_containers(rc):
        pins[f"kuberay {container['name']} image"] = RAY_IMAGE_RE.fullmatch(container["image"])["version"]
    dockerfile = KUBERAY_DOCKERFILE.read_text()
    pins["kuberay Dockerfile FROM"] = RAY_IMAGE_RE.search(dockerfile)["version"]
    pins["kuberay Dockerfile pip"] = RAY_PIN_RE.search(dockerfile)["version"]
    return pins


def test_ray_pins_equal_the_pyproject_floor() -> None:
    req = requirement("ray")
    pins = ray_pins()
    assert any("setup_commands" in where for where in pins), "launcher does not pin ray[default]==X"
    assert len(set(pins.values())) == 1, f"infra pins differing Ray versions: {pins}"
    pinned = Version(next(iter(pins.values())))
    assert pinned == floor(req), f"pyproject has {req}; infra pins {pinned} ({pins})"
    assert req.specifier.contains(pinned)


def test_ray_images_use_a_python_the_project_supports() -> None:
    requires_python = pyproject()["project"]["requires-python"]
    texts = [LAUNCHER.read_text(), RAYCLUSTER.read_text(), KUBERAY_DOCKERFILE.read_text()]
    tags = {m["py"] for text in texts for m in RAY_IMAGE_RE.finditer(text)}
    assert len(tags) == 1, f"ray images mix Python versions: {tags}"
    py = tags.pop()
    version = f"{py[0]}.{py[1:]}"
    assert Requirement(f"python{requires_python}").specifier.contains(version), (version, requires_python)


def test_mlflow_server_version_satisfies_pyproject() -> None:
    req = requirement("mlflow")
    dockerfile_pin = re.search(r"^ARG MLFLOW_VERSION=(\S+)$", MLFLOW_DOCKERFILE.read_text(), re.M)[1]
    env_pin = re.search(r"^MLFLOW_VERSION=(\S+)$", ENV_EXAMPLE.read_text(), re.M)[1]
    assert dockerfile_pin == env_pin
    assert req.specifier.contains(dockerfile_pin), f"pyproject has {req}; the server image pins {dockerfile_pin}"


# --- MLflow server ----------------------------------------------------------------------------


def test_compose_mlflow_server_uses_postgres_and_s3() -> None:
    services = load_yaml(COMPOSE)["services"]
    assert {"postgres", "minio", "create-bucket", "mlflow"} <= set(services)
    mlflow = services["mlflow"]
    command = mlflow["command"]
    assert command[:2] == ["mlflow", "server"]
    flags = dict(arg.split("=", 1) if "=" in arg else (arg, "") for arg in command[2:])
    assert flags["--backend-store-uri"].startswith("postgresql://")
    assert flags["--backend-store-uri"].endswith("@postgres:5432/${POSTGRES_DB}")
    assert flags["--artifacts-destination"].startswith("s3://${MLFLOW_BUCKET}")
    assert "--serve-artifacts" in flags
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert mlflow["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"
    assert mlflow["build"]["args"]["MLFLOW_VERSION"].startswith("${MLFLOW_VERSION")
    dockerfile = MLFLOW_DOCKERFILE.read_text()
    assert "psycopg2" in dockerfile and "boto3" in dockerfile


def test_compose_variables_match_env_example() -> None:
    used = set(re.findall(r"(?<!\$)\$\{(\w+)", COMPOSE.read_text()))
    defined = {
        line.split("=", 1)[0]
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    assert used - defined == set(), "used by docker-compose.yaml but missing from .env.example"
    assert defined - used == set(), "set in .env.example but unused by docker-compose.yaml"


# --- local loopback scripts -------------------------------------------------------------------


def test_local_scripts_bind_loopback_and_disable_telemetry() -> None:
    mlflow_start = (INFRA / "mlflow" / "start_local.sh").read_text()
    for needle in (
        "--host 127.0.0.1",
        "--workers 1",
        'sqlite:///$state_dir/mlflow.db',
        '--artifacts-destination "$state_dir/artifacts" --serve-artifacts',
        "MLFLOW_DISABLE_TELEMETRY=true",
        "DO_NOT_TRACK=true",
    ):
        assert needle in mlflow_start, needle
    ray_start = (INFRA / "ray" / "start_local.sh").read_text()
    for needle in ("--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
                   "RAY_USAGE_STATS_ENABLED=0"):
        assert needle in ray_start, needle


def test_telemetry_variable_is_the_one_mlflow_reads() -> None:
    env_vars = pytest.importorskip("mlflow.environment_variables")
    if not hasattr(env_vars, "MLFLOW_DISABLE_TELEMETRY"):
        pytest.skip("this mlflow predates telemetry (< 3.2)")
    assert env_vars.MLFLOW_DISABLE_TELEMETRY.name == "MLFLOW_DISABLE_TELEMETRY"
