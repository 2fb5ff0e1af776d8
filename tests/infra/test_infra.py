"""Production-stack files, checked by parsing (no Docker engine, no network): the compose
stack, Dockerfiles, MLflow server configuration, the GPU work-pool template and prefect.yaml
must agree with each other and with the repository."""

from __future__ import annotations

import configparser
import fnmatch
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
DOCKER = REPO / "docker"
COMPOSE_FILE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
K8S_TEMPLATE = INFRA / "k8s" / "gpu-work-pool.json"
PREFECT_YAML = REPO / "prefect.yaml"
ENTRYPOINT = REPO / "mlflow" / "entrypoint.sh"
AUTH_INI = REPO / "mlflow" / "basic_auth.ini"

SERVICES = {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "worker-cpu",
            "worker-gpu"}
# service -> the Dockerfile it must be built from
BUILT_FROM = {
    "mlflow": "docker/mlflow.Dockerfile",
    "prefect-server": "docker/prefect.Dockerfile",
    "worker-cpu": "docker/trainer.Dockerfile",
    "worker-gpu": "docker/trainer-gpu.Dockerfile",
}
# deployment -> (entrypoint, work pool)
DEPLOYMENTS = {
    "scheduled": ("flows.retrain:retrain_flow", "cpu"),
    "promote": ("flows.promote:promote_flow", "cpu"),
    "batch-predict": ("flows.batch_predict:batch_predict_flow", "cpu"),
    "gpu": ("flows.tune_worker:tune_worker_flow", "gpu"),
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|_KEY$|KEY_ID$|TOKEN|AUTH_STRING")
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}; $$ escapes a dollar
VAR_REF = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)((?::?[-?])([^}]*))?\}")


# ----------------------------------------------------------------------------- helpers
def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE in .env.example: {line!r}"
        values[key.strip()] = value.strip()
    return values


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose-style interpolation (the subset the compose file uses)."""

    def repl(m: re.Match) -> str:
        name, op_part, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        if name in env and (env[name] != "" or not op_part.startswith(":")):
            return env[name]
        if "?" in op_part:
            raise KeyError(f"${{{name}}} is required: {arg}")
        return arg

    return VAR_REF.sub(repl, text).replace("$$", "$")


@pytest.fixture(scope="module")
def compose_raw() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    """The compose file as compose would see it with infra/.env copied from the example."""
    return yaml.safe_load(interpolate(COMPOSE_FILE.read_text(), env_example()))


def service_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def argv(service: dict) -> list[str]:
    parts = []
    for key in ("entrypoint", "command"):
        value = service.get(key) or []
        parts += value.split() if isinstance(value, str) else [str(v) for v in value]
    return parts


def published_ports(service: dict) -> set[int]:
    ports = set()
    for p in service.get("ports", []):
        if isinstance(p, dict):
            ports.add(int(p["published"]))
        else:
            ports.add(int(str(p).split(":")[-2]))  # [ip:]published:target
    return ports


def dockerfile(name: str) -> str:
    return (DOCKER / name).read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    logical, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        buf += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            logical.append(buf.strip())
            buf = ""
    return [(s.split(None, 1)[0].upper(), s.split(None, 1)[1] if " " in s else "") for s in logical]


def run_entrypoint(env: dict[str, str], tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not available")
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TMPDIR": str(tmp_path),
            "PYTHON": sys.executable, "MLFLOW_ENTRYPOINT_DRY_RUN": "1",
            "MLFLOW_AUTH_CONFIG_TEMPLATE": str(AUTH_INI), **env}
    return subprocess.run([bash, str(ENTRYPOINT), *args], env=full, capture_output=True,
                          text=True, timeout=30)


# ----------------------------------------------------------------------------- compose
def test_compose_has_the_stack_services(compose):
    assert SERVICES <= set(compose["services"]), SERVICES - set(compose["services"])


def test_compose_builds_from_existing_dockerfiles(compose):
    for name, expected in BUILT_FROM.items():
        build = compose["services"][name]["build"]
        context = (INFRA / build["context"]).resolve()
        assert context == REPO, f"{name}: build context must be the repository root"
        path = context / build["dockerfile"]
        assert path.is_file(), f"{name}: {path} does not exist"
        assert path == REPO / expected, f"{name} is built from {build['dockerfile']}"
    # The workers run the images those Dockerfiles build.
    assert compose["services"]["worker-cpu"]["image"].startswith("cxr-trainer:")
    assert compose["services"]["worker-gpu"]["image"].startswith("cxr-trainer-gpu:")


def test_every_compose_variable_is_in_env_example():
    text = COMPOSE_FILE.read_text()
    used = {m.group(1) for m in VAR_REF.finditer(text)}
    unbraced = re.findall(r"(?<!\$)\$(?![{$])[A-Za-z_]", text)
    assert not unbraced, "use ${VAR} (or $$ for a literal dollar) in the compose file"
    documented = set(env_example())
    assert used, "no ${VAR} found: the secrets must come from the environment"
    assert used <= documented, f"missing from infra/.env.example: {sorted(used - documented)}"
    assert documented <= used, f"unused in the compose file: {sorted(documented - used)}"


def test_env_example_holds_placeholders_only():
    values = env_example()
    secrets = {k: v for k, v in values.items() if SECRET_NAME.search(k)}
    assert {"POSTGRES_PASSWORD", "MLFLOW_DB_PASSWORD", "PREFECT_DB_PASSWORD",
            "MINIO_ROOT_PASSWORD", "S3_SECRET_ACCESS_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD",
            "MLFLOW_FLASK_SERVER_SECRET_KEY", "PREFECT_AUTH_STRING"} <= set(secrets)
    for key, value in secrets.items():
        assert "change-me" in value, f"{key} in .env.example must be a change-me placeholder"
    # MLflow refuses admin passwords under 12 characters.
    assert len(values["MLFLOW_AUTH_ADMIN_PASSWORD"]) >= 12
    assert (INFRA / ".gitignore").read_text().splitlines().count(".env") == 1


def test_required_secrets_have_no_default_in_compose():
    text = COMPOSE_FILE.read_text()
    for m in VAR_REF.finditer(text):
        name, op_part = m.group(1), m.group(2) or ""
        if SECRET_NAME.search(name):
            assert op_part.startswith(":?"), f"${{{name}}} must be required (:?), not defaulted"


def test_no_literal_secrets_in_compose(compose_raw):
    for name, service in compose_raw["services"].items():
        for key, value in service_env(service).items():
            if SECRET_NAME.search(key):
                assert value.startswith("${") and value.endswith("}"), \
                    f"{name}: {key} must come from the environment, not a literal"
            for password in re.findall(r"://[^:/@\s]+:([^@]*)@", value):  # URL credentials
                assert re.fullmatch(r"\$\{[A-Z0-9_]+(:\?[^}]*)?\}", password), \
                    f"{name}: {key} has a literal password in its URL"
    for line in COMPOSE_FILE.read_text().splitlines():
        m = re.match(r"\s*[\w-]*(password|secret)[\w-]*\s*:\s*(\S.*)$", line, re.IGNORECASE)
        if m:
            assert m.group(2).startswith("${"), f"literal secret: {line.strip()}"


def test_mlflow_service_uses_minio_s3_and_basic_auth(compose):
    services = compose["services"]
    mlflow = services["mlflow"]
    env = service_env(mlflow)
    endpoint = urlsplit(env["MLFLOW_S3_ENDPOINT_URL"])
    assert endpoint.scheme == "http", "MLFLOW_S3_ENDPOINT_URL is an http URL, never s3://"
    assert endpoint.hostname == "minio" and endpoint.hostname in services
    assert endpoint.port == 9000
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    bucket = urlsplit(env["MLFLOW_ARTIFACTS_DESTINATION"]).netloc
    assert service_env(services["minio-init"])["CXR_S3_BUCKET"] == bucket
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://")
    assert urlsplit(env["MLFLOW_BACKEND_STORE_URI"]).hostname == "postgres"
    assert len(env["MLFLOW_AUTH_ADMIN_PASSWORD"]) >= 12
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    assert "mlflow:5000" in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    deps = mlflow["depends_on"]
    assert deps["postgres"]["condition"] == "service_healthy"
    assert deps["minio-init"]["condition"] == "service_completed_successfully"
    assert "/health" in " ".join(mlflow["healthcheck"]["test"])
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "/api/health" in " ".join(services["prefect-server"]["healthcheck"]["test"])


def test_mlflow_entrypoint_builds_the_server_command_from_compose_env(compose, tmp_path):
    env = service_env(compose["services"]["mlflow"])
    result = run_entrypoint(env, tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "--artifacts-destination s3://" in out
    assert "--host 0.0.0.0" in out and "--port 5000" in out
    assert "--app-name basic-auth" in out
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] not in out
    db_password = env_example()["MLFLOW_DB_PASSWORD"]
    assert db_password not in out, "the database password must not be printed"
    assert "--backend-store-uri" not in out, "the backend URI (with password) stays in the env"
    # The rendered auth config: private, with the user-store URI substituted.
    rendered = Path(re.search(r"auth config: (\S+)", out).group(1))
    assert rendered.stat().st_mode & 0o077 == 0
    cfg = configparser.ConfigParser()
    cfg.read(rendered)
    assert cfg["mlflow"]["database_uri"] == env["MLFLOW_AUTH_DATABASE_URI"]
    assert cfg["mlflow"]["default_permission"] == "READ"


def test_mlflow_entrypoint_guards(tmp_path):
    base = {"MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg://mlflow:pw@postgres:5432/mlflow",
            "MLFLOW_ARTIFACTS_DESTINATION": "s3://cxr/mlflow"}
    plain = run_entrypoint(base, tmp_path, "--gunicorn-opts", "--timeout=60")
    assert plain.returncode == 0, plain.stderr
    assert "--app-name" not in plain.stdout  # no admin password: no auth
    assert plain.stdout.rstrip().endswith("--gunicorn-opts --timeout=60")
    s3_scheme = run_entrypoint({**base, "MLFLOW_S3_ENDPOINT_URL": "s3://minio:9000"}, tmp_path)
    assert s3_scheme.returncode != 0 and "http" in s3_scheme.stderr
    short = run_entrypoint({**base, "MLFLOW_AUTH_ADMIN_PASSWORD": "too-short"}, tmp_path)
    assert short.returncode != 0 and "12" in short.stderr
    no_secret = run_entrypoint({**base, "MLFLOW_AUTH_ADMIN_PASSWORD": "long-enough-pw",
                                "MLFLOW_AUTH_DATABASE_URI": "sqlite:///x.db"}, tmp_path)
    assert no_secret.returncode != 0 and "MLFLOW_FLASK_SERVER_SECRET_KEY" in no_secret.stderr
    missing = run_entrypoint({"MLFLOW_ARTIFACTS_DESTINATION": "s3://cxr/mlflow"}, tmp_path)
    assert missing.returncode != 0 and "MLFLOW_BACKEND_STORE_URI" in missing.stderr


def test_basic_auth_ini():
    cfg = configparser.ConfigParser()
    cfg.read(AUTH_INI)
    section = cfg["mlflow"]
    assert section["default_permission"] == "READ"
    assert section["database_uri"] == "${MLFLOW_AUTH_DATABASE_URI}"
    assert section["admin_username"]
    assert "admin_password" not in section, "the admin password comes from the environment"
    assert not (REPO / "mlflow" / "__init__.py").exists()
    spec = importlib.util.find_spec("mlflow")
    assert spec is not None and spec.origin is not None
    assert not Path(spec.origin).resolve().is_relative_to(REPO / "mlflow")


def test_gpu_worker_reserves_nvidia_devices(compose):
    worker = compose["services"]["worker-gpu"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
               and d.get("count") == "all" for d in devices)
    assert "gpu" in worker.get("profiles", [])  # hosts without NVIDIA runtime can still `up`


def test_workers_poll_their_pools(compose):
    services = compose["services"]
    for name, pool in (("worker-cpu", "cpu"), ("worker-gpu", "gpu")):
        worker = services[name]
        cmd = argv(worker)
        assert cmd[:3] == ["prefect", "worker", "start"], f"{name}: {cmd}"
        assert cmd[cmd.index("--pool") + 1] == pool
        env = service_env(worker)
        api = urlsplit(env["PREFECT_API_URL"])
        assert api.hostname in services and api.port == 4200 and api.path == "/api"
        assert urlsplit(env["CXR_TRACKING_URI"]).hostname == "mlflow"
        assert env["MLFLOW_TRACKING_USERNAME"] and env["MLFLOW_TRACKING_PASSWORD"]
        assert worker["depends_on"]["prefect-server"]["condition"] == "service_healthy"
        # Chief and GPU workers share the state home (tuner work directory) at one path.
        assert any(str(v).startswith("cxr-home:/var/lib/cxr") for v in worker["volumes"])
        assert env["CXR_HOME"] == "/var/lib/cxr"


def test_ports_published(compose):
    services = compose["services"]
    assert 5000 in published_ports(services["mlflow"])
    assert 4200 in published_ports(services["prefect-server"])
    assert {9000, 9001} <= published_ports(services["minio"])
    assert not published_ports(services["postgres"]), "PostgreSQL stays on the internal network"


def test_one_network_and_named_volumes(compose):
    networks = set(compose["networks"])
    assert len(networks) == 1
    for name, service in compose["services"].items():
        assert set(service.get("networks", [])) == networks, f"{name} is not on {networks}"
    volumes = set(compose["volumes"])
    assert {"postgres-data", "minio-data"} <= volumes
    assert "postgres-data:/var/lib/postgresql/data" in compose["services"]["postgres"]["volumes"]
    assert "minio-data:/data" in compose["services"]["minio"]["volumes"]


def test_postgres_init_creates_the_databases(compose):
    sql = (INFRA / "postgres-init.sql").read_text()
    created = set(re.findall(r"CREATE DATABASE (\w+)", sql))
    assert {"mlflow", "prefect"} <= created
    services = compose["services"]
    uris = [service_env(services["mlflow"])["MLFLOW_BACKEND_STORE_URI"],
            service_env(services["mlflow"])["MLFLOW_AUTH_DATABASE_URI"],
            service_env(services["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"]]
    assert uris[2].startswith("postgresql+asyncpg://")
    for uri in uris:
        parts = urlsplit(uri)
        assert parts.hostname == "postgres" and parts.path.lstrip("/") in created, uri
        assert re.search(rf"CREATE ROLE {parts.username} LOGIN", sql), uri
    postgres = services["postgres"]
    assert "./postgres-init.sql:/docker-entrypoint-initdb.d/10-cxr.sql:ro" in \
        compose["services"]["postgres"]["volumes"]
    for var in re.findall(r"\\getenv \w+ (\w+)", sql):
        assert var in service_env(postgres), f"postgres container lacks {var}"


def test_minio_init_script(compose):
    init = compose["services"]["minio-init"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    script = INFRA / "minio-init.sh"
    assert "./minio-init.sh:/minio-init.sh:ro" in init["volumes"]
    text = script.read_text()
    assert "mc mb --ignore-existing" in text  # idempotent bucket creation
    required = set(re.findall(r': "\$\{(\w+):\?', text))
    assert required and required <= set(service_env(init)), required - set(service_env(init))
    sh = shutil.which("sh")
    if sh:
        assert subprocess.run([sh, "-n", str(script)], capture_output=True).returncode == 0
    bash = shutil.which("bash")
    if bash:
        assert subprocess.run([bash, "-n", str(ENTRYPOINT)], capture_output=True).returncode == 0


# ----------------------------------------------------------------------------- Dockerfiles
@pytest.mark.parametrize("name,extra,other", [("trainer.Dockerfile", "cpu", "gpu"),
                                              ("trainer-gpu.Dockerfile", "gpu", "cpu")])
def test_trainer_dockerfiles(name, extra, other):
    text = dockerfile(name)
    ins = instructions(text)
    assert ins[0][0] == "ARG" or ins[0][0] == "FROM"
    assert re.search(r"python:3\.11-slim", text)
    runs = " ".join(args for op, args in ins if op == "RUN")
    assert f'pip install ".[{extra}]"' in runs
    assert f"[{other}]" not in runs
    assert ("ENTRYPOINT", '["cxr"]') in ins
    user = [args for op, args in ins if op == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert ("WORKDIR", "/opt/cxr") in ins


def test_mlflow_dockerfile_pins():
    text = dockerfile("mlflow.Dockerfile")
    assert re.search(r'"mlflow\[auth\]>=3\.17,<3\.18"', text)
    assert '"psycopg[binary]' in text and '"boto3' in text
    ins = instructions(text)
    assert any(op == "ENTRYPOINT" and "mlflow-entrypoint" in args for op, args in ins)
    assert any(op == "COPY" and "mlflow/entrypoint.sh" in args for op, args in ins)
    user = [args for op, args in ins if op == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    prefect = dockerfile("prefect.Dockerfile")
    assert '"prefect>=3.8,<3.9"' in prefect and '"fastapi>=0.139,<0.151"' in prefect


def test_dockerfile_copy_sources_exist_and_are_not_ignored():
    ignore = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
              if p.strip() and not p.startswith("#")]
    for required in (".venv", ".cxr", "data", "mlruns", "**/*.db"):
        assert required in ignore, f".dockerignore lacks {required}"
    for path in DOCKER.glob("*.Dockerfile"):
        for op, args in instructions(path.read_text()):
            if op != "COPY" or "--from" in args:
                continue
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            for src in sources:
                assert (REPO / src).exists(), f"{path.name}: COPY source {src} missing"
                assert not any(fnmatch.fnmatch(src, pat) for pat in ignore), \
                    f"{path.name}: {src} is excluded by .dockerignore"


# ----------------------------------------------------------------------------- k8s template
def test_gpu_work_pool_template():
    template = json.loads(K8S_TEMPLATE.read_text())
    assert set(template) == {"job_configuration", "variables"}
    props = template["variables"]["properties"]
    job = template["job_configuration"]
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["name"] == "prefect-job" and pod["restartPolicy"] == "Never"
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert resources["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert props["gpu_count"]["type"] == "integer" and props["gpu_count"]["default"] == 1
    assert container["image"] == "{{ image }}" and container["env"] == "{{ env }}"
    assert "trainer-gpu" in props["image"]["default"]
    assert pod["nodeSelector"] == "{{ node_selector }}" and pod["tolerations"] == "{{ tolerations }}"
    assert any(t.get("key") == "nvidia.com/gpu" for t in props["tolerations"]["default"])
    for var in ("namespace", "env", "node_selector", "tolerations", "image"):
        assert var in props
    # Prefect's server-side rule: every placeholder must be a declared variable.
    placeholders = set(re.findall(r"\{\{\s*([\w.]+)\s*\}\}", json.dumps(job)))
    assert placeholders <= set(props), placeholders - set(props)
    # The trainer image's ENTRYPOINT is `cxr`: the job must override it for Prefect's command.
    assert container["command"] == ["/usr/bin/env"] and container["args"] == "{{ command }}"


def test_gpu_work_pool_template_renders_with_prefect():
    templating = pytest.importorskip("prefect.utilities.templating")
    template = json.loads(K8S_TEMPLATE.read_text())
    props = template["variables"]["properties"]
    values = {k: v["default"] for k, v in props.items() if v.get("default") is not None}
    rendered = templating.apply_values(template["job_configuration"], {**values, "gpu_count": 2})
    container = rendered["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["image"] == props["image"]["default"]


# ----------------------------------------------------------------------------- prefect.yaml
@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text())


def test_prefect_yaml_deployments(prefect_yaml):
    deployments = {d["name"]: d for d in prefect_yaml["deployments"]}
    assert set(deployments) == set(DEPLOYMENTS)
    for name, (entrypoint, pool) in DEPLOYMENTS.items():
        d = deployments[name]
        assert d["entrypoint"] == entrypoint
        assert re.fullmatch(r"flows\.\w+:\w+", d["entrypoint"])  # installed module, no path
        assert d["work_pool"]["name"] == pool
        module, func = d["entrypoint"].split(":")
        path = module.replace(".", "/") + ".py"
        if (REPO / path).exists():  # the others land with their flows
            assert re.search(rf"^def {func}\(", (REPO / path).read_text(), re.M), d["entrypoint"]
    assert (REPO / "flows" / "retrain.py").is_file()
    assert deployments["scheduled"]["parameters"]["profile"] == "full"
    assert "data_dir" in deployments["scheduled"]["parameters"]
    assert deployments["scheduled"]["concurrency_limit"] == 1


def test_prefect_yaml_schedule_pull_and_gpu_variables(prefect_yaml):
    deployments = {d["name"]: d for d in prefect_yaml["deployments"]}
    crons = [s["cron"] for s in deployments["scheduled"].get("schedules", []) if "cron" in s]
    assert crons and all(len(c.split()) == 5 for c in crons)
    for name in ("promote", "batch-predict", "gpu"):
        assert not deployments[name].get("schedules"), f"{name} runs on demand"
    # Nothing pulled: the worker imports the installed package, never a checkout path.
    assert prefect_yaml["pull"] == []
    for name in ("trainer.Dockerfile", "trainer-gpu.Dockerfile"):  # the package is installed
        assert any(i == "RUN" and "pip install" in a and "--no-deps ." in a
                   for i, a in instructions(dockerfile(name)))
    job_vars = deployments["gpu"]["work_pool"]["job_variables"]
    assert job_vars["gpu_count"] == 1
    props = json.loads(K8S_TEMPLATE.read_text())["variables"]["properties"]
    assert set(job_vars) <= set(props), "job variables the template lacks are silently ignored"


def test_prefect_yaml_is_valid_for_prefect(prefect_yaml):
    models = pytest.importorskip("prefect.cli.deploy._models")
    parsed = models.PrefectYamlModel.model_validate(prefect_yaml)
    assert {d.name for d in parsed.deployments} == set(DEPLOYMENTS)
    retrain = next(d for d in parsed.deployments if d.name == "scheduled")
    assert retrain.schedules and retrain.schedules[0].cron == "0 3 * * 1"


def test_production_doc_mentions_the_commands():
    doc = (REPO / "docs" / "production.md").read_text()
    for text in ("cp infra/.env.example infra/.env",
                 "docker compose -f infra/docker-compose.yml --env-file infra/.env up -d",
                 "--base-job-template infra/k8s/gpu-work-pool.json",
                 "deploy --all", "/#/experiments/", "KERASTUNER_TUNER_ID"):
        assert text in doc, text


def test_retrain_has_a_drift_trigger_off_by_default(prefect_yaml):
    retrain = next(d for d in prefect_yaml["deployments"] if d["entrypoint"].startswith("flows.retrain:"))
    (trigger,) = retrain["triggers"]
    assert trigger["expect"] == ["cxr.drift.detected"] and trigger["enabled"] is False
    models = pytest.importorskip("prefect.cli.deploy._models")
    parsed = models.PrefectYamlModel.model_validate(prefect_yaml)
    assert next(d for d in parsed.deployments if d.name == retrain["name"]).triggers


# ----------------------------------------------------------------------------- issue 14 details
def test_dependency_layer_does_not_depend_on_the_readme():
    for name in ("trainer.Dockerfile", "trainer-gpu.Dockerfile"):
        steps = instructions(dockerfile(name))
        first_install = next(i for i, (op, args) in enumerate(steps)
                             if op == "RUN" and "pip install" in args)
        copied = " ".join(a for op, a in steps[:first_install] if op == "COPY")
        assert "pyproject.toml" in copied and "README" not in copied, name


def test_gpu_image_states_the_driver_it_needs():
    text = dockerfile("trainer-gpu.Dockerfile")
    assert "NVIDIA_REQUIRE_CUDA" in text and re.search(r"driver >= \d+", text)


def test_s3_endpoint_is_settable_and_the_oracle_is_reachable(compose):
    mlflow_env = compose["services"]["mlflow"]["environment"]
    worker_env = compose["services"]["worker-cpu"]["environment"]
    assert "${S3_ENDPOINT_URL:-" in COMPOSE_FILE.read_text() and mlflow_env["MLFLOW_S3_ENDPOINT_URL"]
    # GPU workers on other hosts dial the chief by name; it binds that interface, not 0.0.0.0.
    assert worker_env["CXR_TUNER_ORACLE_HOST"] == "worker-cpu"
    assert worker_env["CXR_TUNER_ORACLE_BIND_HOST"] == "worker-cpu"
