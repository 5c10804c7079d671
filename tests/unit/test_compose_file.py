"""docker-compose.yml is accepted by the real Compose parser and describes the system in ARCHITECTURE.md.

The parser is Docker Compose itself (`docker compose config`): changeflow/deploy/compose_check.sh builds it from
the Go module proxy on first use (about 2 minutes, then cached under .changeflow/tools/), so this test
needs Go and network access to the Go module proxy on a new machine, and nothing else; no Docker
engine. It is never skipped: a missing tool is a failure.

`config --format json` gives the model after Compose has parsed, merged (the x-healthcheck anchors),
interpolated and validated it against the Compose specification; the structural checks below read
that model, not the YAML, so they see what `docker compose up` would run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from changeflow.deploy.clickhouse import ClickHouseServerSettings
from changeflow.deploy.redis import RedisServerSettings
from changeflow.deploy.search_engine import SearchServerSettings
from changeflow.settings import Settings
from changeflow.sinks.clickhouse import ClickHouseSettings
from changeflow.sinks.postgres import PostgresStoreSettings
from changeflow.sinks.redis import RedisSettings
from changeflow.sinks.search import SearchSettings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
CHECK = REPO / "changeflow" / "deploy" / "compose_check.sh"
ENV_EXAMPLE = REPO / ".env.example"

# Distinct sentinel values, so a test can tell where each secret ended up.
SECRETS = {
    "CHANGEFLOW_PG_SUPERUSER_PASSWORD": "sentinel-pg-superuser",
    "CHANGEFLOW_PG_REPLICATION_PASSWORD": "sentinel-pg-replication",
    "CHANGEFLOW_CLICKHOUSE_PASSWORD": "sentinel-clickhouse",
    "CHANGEFLOW_REDIS_PASSWORD": "sentinel-redis",
    "CHANGEFLOW_GRAFANA_ADMIN_PASSWORD": "sentinel-grafana-admin",
}

# README "The native local stack": default ports: service -> (its settings class, its field, port). The stores'
# servers have settings classes of their own (changeflow/deploy/<server>.py), read from the same variables.
DESIGN_PORTS: dict[str, tuple[type[BaseSettings], str, int]] = {
    "postgres": (Settings, "pg_port", 5432),
    "kafka": (Settings, "kafka_port", 9092),
    "connect": (Settings, "connect_port", 8083),
    "redis": (RedisServerSettings, "port", 6379),
    "elasticsearch": (SearchServerSettings, "port", 9200),
    "clickhouse": (ClickHouseServerSettings, "port", 8123),
    "worker": (Settings, "worker_web_port", 6066),
}


def variable(cls: type[BaseSettings], field: str) -> str:
    return f"{cls.model_config.get('env_prefix', '')}{field}".upper()

SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL", re.IGNORECASE)


def _clean_env() -> dict[str, str]:
    """The caller's environment without anything that would steer interpolation."""
    keep_state = {"CHANGEFLOW_STATE_DIR"}  # where the cached docker-compose binary lives
    return {
        k: v for k, v in os.environ.items() if not (k.startswith(("CHANGEFLOW_", "COMPOSE_")) and k not in keep_state)
    }


def _config(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`docker compose config ARGS` with exactly `env` as its .env (never the developer's .env)."""
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return subprocess.run(
        ["bash", str(CHECK), "compose", "--env-file", str(env_file), "config", *args],
        cwd=REPO,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=900,  # the first call may build Docker Compose
    )


def _model(tmp_path: Path, env: dict[str, str], *args: str) -> dict:
    proc = _config(tmp_path, env, "--format", "json", *args)
    assert proc.returncode == 0, f"docker compose config refused the file:\n{proc.stderr}"
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def compose_binary() -> str:
    """Builds (once) and returns the real docker-compose binary; fails, never skips, without it."""
    proc = subprocess.run(
        ["bash", str(CHECK), "path"],
        cwd=REPO,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"could not obtain Docker Compose:\n{proc.stderr}"
    path = proc.stdout.strip().splitlines()[-1]
    version = subprocess.run([path, "version"], capture_output=True, text=True, check=True).stdout
    assert "Docker Compose version v2." in version
    return path


@pytest.fixture(scope="module")
def model(compose_binary: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _model(tmp_path_factory.mktemp("compose"), SECRETS)


@pytest.fixture(scope="module")
def raw_model(compose_binary: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The model before interpolation: what is literally written in the file."""
    return _model(tmp_path_factory.mktemp("compose-raw"), {}, "--no-interpolate")


def _service(model: dict, name: str) -> dict:
    assert name in model["services"], f"no service {name!r} in docker-compose.yml"
    return model["services"][name]


def _env(service: dict) -> dict[str, str]:
    return {k: ("" if v is None else str(v)) for k, v in (service.get("environment") or {}).items()}


def _published(service: dict) -> dict[int, tuple[str, int]]:
    """container port -> (host ip, host port)."""
    return {int(p["target"]): (p.get("host_ip", ""), int(p["published"])) for p in service.get("ports", [])}


def _healthcheck_text(service: dict) -> str:
    return " ".join(service["healthcheck"]["test"])


# --- the parser ------------------------------------------------------------------------------------


def test_real_compose_parser_accepts_the_file(compose_binary: str, tmp_path: Path) -> None:
    proc = _config(tmp_path, SECRETS, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", f"compose warned about the file:\n{proc.stderr}"


def test_the_file_needs_no_engine_and_names_the_project(model: dict) -> None:
    assert model["name"] == "changeflow"
    assert set(DESIGN_PORTS) | {"mongodb"} <= set(model["services"])


# --- secrets ---------------------------------------------------------------------------------------


def test_missing_secrets_are_refused_with_a_pointer_to_env_example(compose_binary: str, tmp_path: Path) -> None:
    for missing in SECRETS:
        env = {k: v for k, v in SECRETS.items() if k != missing}
        proc = _config(tmp_path, env, "--quiet")
        assert proc.returncode != 0, f"compose started without {missing}"
        assert missing in proc.stderr and ".env.example" in proc.stderr, proc.stderr


def test_no_literal_secret_in_the_file(raw_model: dict) -> None:
    required = re.compile(r"^\$\{(?P<var>[A-Z][A-Z0-9_]*):\?[^}]*\}$")
    for name, service in raw_model["services"].items():
        for key, value in _env(service).items():
            if SECRET_NAME.search(key):
                assert required.match(value), (
                    f"{name}.{key} must come from a required variable (${{VAR:?...}}), got {value!r}"
                )
    # No secret variable is given a default anywhere (${..._PASSWORD:-x} would be a literal secret).
    text = COMPOSE_FILE.read_text()
    assert not re.search(r"\$\{[A-Z0-9_]*(PASSWORD|SECRET|TOKEN)[A-Z0-9_]*:?-", text)


def test_secrets_reach_only_the_services_that_need_them(model: dict) -> None:
    where = {
        secret: sorted(
            name for name, service in model["services"].items() if any(v == value for v in _env(service).values())
        )
        for secret, value in SECRETS.items()
    }
    assert where == {
        "CHANGEFLOW_PG_SUPERUSER_PASSWORD": ["postgres", "worker"],
        "CHANGEFLOW_PG_REPLICATION_PASSWORD": ["connect", "postgres", "worker"],
        "CHANGEFLOW_CLICKHOUSE_PASSWORD": ["clickhouse", "worker"],
        "CHANGEFLOW_REDIS_PASSWORD": ["redis", "worker"],
        "CHANGEFLOW_GRAFANA_ADMIN_PASSWORD": ["grafana"],
    }


def test_env_example_documents_every_variable_the_file_reads(raw_model: dict) -> None:
    # Read from the uninterpolated model, so comments in the file don't count.
    used = set(re.findall(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)", json.dumps(raw_model)))
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.MULTILINE))
    assert used, "docker-compose.yml reads no variables?"
    assert used <= documented, f"undocumented in .env.example: {sorted(used - documented)}"
    # Secret lines ship commented out and empty: copying the example sets no password.
    for line in ENV_EXAMPLE.read_text().splitlines():
        if SECRET_NAME.search(line.split("=")[0]) and "=" in line and not line.startswith("#"):
            pytest.fail(f".env.example sets a secret: {line!r}")


def test_env_and_state_never_reach_the_image_build() -> None:
    ignore = (REPO / "changeflow" / "deploy" / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    for pattern in (".env", ".env.*", ".changeflow/", ".git/"):
        assert pattern in ignore


# --- health and start order ------------------------------------------------------------------------


def test_every_service_has_a_healthcheck(model: dict) -> None:
    for name, service in model["services"].items():
        hc = service.get("healthcheck")
        assert hc and not hc.get("disable"), f"{name} has no healthcheck"
        assert hc["test"][0] in ("CMD", "CMD-SHELL") and len(hc["test"]) > 1, f"{name}: {hc['test']}"


def test_every_dependency_waits_for_health(model: dict) -> None:
    for name, service in model["services"].items():
        for dep, how in (service.get("depends_on") or {}).items():
            assert dep in model["services"], f"{name} depends on unknown {dep}"
            assert how["condition"] == "service_healthy", f"{name} -> {dep}: {how['condition']}"
    deps = {n: set(s.get("depends_on") or {}) for n, s in model["services"].items()}
    assert deps["connect"] >= {"kafka", "postgres", "mongodb"}
    assert deps["worker"] >= {"kafka", "connect", "redis", "elasticsearch", "clickhouse"}
    assert deps["prometheus"] >= {"worker"} and deps["grafana"] >= {"prometheus"}


# --- ports -----------------------------------------------------------------------------------------


def test_published_ports_are_the_design_defaults_on_loopback(model: dict) -> None:
    for name, (cls, field, port) in DESIGN_PORTS.items():
        assert cls.model_fields[field].default == port, f"{cls.__name__}.{field} disagrees with the default ports"
        published = _published(_service(model, name))
        assert published.get(port) == ("127.0.0.1", port), f"{name}: {published}"
    for name, service in model["services"].items():
        for host_ip, _ in _published(service).values():
            assert host_ip == "127.0.0.1", f"{name} publishes on {host_ip or 'all interfaces'}"


def test_ports_move_with_the_same_variables_as_the_native_stack(compose_binary: str, tmp_path: Path) -> None:
    moved = {variable(cls, field): port + 10000 for cls, field, port in DESIGN_PORTS.values()}
    m = _model(tmp_path, {**SECRETS, **{k: str(v) for k, v in moved.items()}})
    for name, (_cls, _field, port) in DESIGN_PORTS.items():
        assert _published(m["services"][name])[port] == ("127.0.0.1", port + 10000), name
    # The host listener is advertised with the moved port, or host clients would be sent to 9092.
    advertised = _env(m["services"]["kafka"])["KAFKA_ADVERTISED_LISTENERS"]
    assert "localhost:19092" in advertised


# --- each service ----------------------------------------------------------------------------------


def test_postgres_has_logical_wal_and_the_commerce_init(model: dict) -> None:
    pg = _service(model, "postgres")
    assert re.fullmatch(r"postgres:1[56](\..*)?", pg["image"])
    assert "wal_level=logical" in pg["command"]
    assert _env(pg)["POSTGRES_DB"] == "commerce"
    mounts = {v["target"]: Path(v["source"]) for v in pg["volumes"] if v["type"] == "bind"}
    init = {t: s for t, s in mounts.items() if t.startswith("/docker-entrypoint-initdb.d/")}
    assert REPO / "changeflow" / "deploy" / "sql" / "commerce.sql" in init.values()
    # The schema runs before the script that sets the replication password.
    order = [init[t].name for t in sorted(init)]
    assert order == ["commerce.sql", "20-replication-password.sh"], order
    assert "changeflow_pub" in _healthcheck_text(pg)


def test_replication_password_script_is_valid_shell(model: dict) -> None:
    script = REPO / "changeflow" / "deploy" / "docker" / "postgres" / "20-replication-password.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert ":'password'" in script.read_text()  # quoted by psql, not spliced into SQL


def test_mongodb_is_a_single_node_replica_set(model: dict) -> None:
    mongo = _service(model, "mongodb")
    cmd = mongo["command"]
    assert cmd[cmd.index("--replSet") + 1] == "rs0"
    assert "rs.initiate" in _healthcheck_text(mongo)


def test_kafka_is_one_kraft_node_with_an_internal_and_a_host_listener(model: dict) -> None:
    kafka = _service(model, "kafka")
    env = _env(kafka)
    assert kafka["image"].startswith("apache/kafka:")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    listeners = dict(item.split("://") for item in env["KAFKA_LISTENERS"].split(","))
    advertised = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert len(advertised) == 2
    assert set(advertised) <= set(listeners)
    hosts = {name: addr.rsplit(":", 1) for name, addr in advertised.items()}
    internal = [n for n, (h, _) in hosts.items() if h == "kafka"]
    external = [n for n, (h, _) in hosts.items() if h == "localhost"]
    assert len(internal) == 1 and len(external) == 1, advertised
    # The host listener is the one published on 9092.
    assert listeners[external[0]] == ":9092" and _published(kafka)[9092] == ("127.0.0.1", 9092)
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] == internal[0]
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] not in advertised
    # Containers use the internal listener.
    internal_addr = advertised[internal[0]]
    assert _env(model["services"]["connect"])["BOOTSTRAP_SERVERS"] == internal_addr
    worker = _env(model["services"]["worker"])
    assert f"{worker['CHANGEFLOW_KAFKA_HOST']}:{worker['CHANGEFLOW_KAFKA_PORT']}" == internal_addr


def test_connect_is_debezium_3_distributed_with_the_env_config_provider(model: dict) -> None:
    connect = _service(model, "connect")
    env = _env(connect)
    assert re.fullmatch(r"quay\.io/debezium/connect:3(\..+)?", connect["image"])
    for topic in ("CONFIG_STORAGE_TOPIC", "OFFSET_STORAGE_TOPIC", "STATUS_STORAGE_TOPIC"):
        assert env[topic]
    assert len({env["CONFIG_STORAGE_TOPIC"], env["OFFSET_STORAGE_TOPIC"], env["STATUS_STORAGE_TOPIC"]}) == 3
    assert env["CONNECT_CONFIG_PROVIDERS"] == "env,file,dir"
    assert env["CONNECT_CONFIG_PROVIDERS_ENV_CLASS"] == "org.apache.kafka.common.config.provider.EnvVarConfigProvider"
    # ${env:CHANGEFLOW_PG_REPLICATION_PASSWORD} resolves: allowed by the pattern, and present.
    pattern = env["CONNECT_CONFIG_PROVIDERS_ENV_PARAM_ALLOWLIST_PATTERN"]
    assert re.fullmatch(pattern, "CHANGEFLOW_PG_REPLICATION_PASSWORD")
    assert not re.fullmatch(pattern, "PATH")
    assert env["CHANGEFLOW_PG_REPLICATION_PASSWORD"] == SECRETS["CHANGEFLOW_PG_REPLICATION_PASSWORD"]
    assert _published(connect)[8083] == ("127.0.0.1", 8083)


def test_connect_providers_and_client_policy_match_the_native_worker(model: dict, tmp_path: Path) -> None:
    """The image turns CONNECT_A_B into worker property a.b: compose's providers are the native worker's,
    except the folder secret files live in (/run/secrets in a container)."""
    from changeflow.deploy.connect import ConnectService

    env = _env(_service(model, "connect"))
    compose = {key.removeprefix("CONNECT_").lower().replace("_", "."): value
               for key, value in env.items() if key.startswith("CONNECT_CONFIG_PROVIDERS")
               or key == "CONNECT_CONNECTOR_CLIENT_CONFIG_OVERRIDE_POLICY"}
    native = {k: str(v) for k, v in ConnectService(Settings(state_dir=tmp_path)).worker_properties().items()
              if k.startswith("config.providers") or k == "connector.client.config.override.policy"}
    assert set(compose) == set(native)
    for key, value in native.items():
        if key.endswith(".allowed.paths"):
            assert value == str(tmp_path / "secrets") and compose[key] == "/run/secrets", key
        else:
            assert compose[key] == value, key
    assert compose["connector.client.config.override.policy"] == "None"


def test_connect_producer_settings_match_the_native_worker(model: dict, tmp_path: Path) -> None:
    """Debezium's producer (batching, linger, compression) is the same in a container as on the native stack."""
    from changeflow.deploy.connect import ConnectService

    env = _env(_service(model, "connect"))
    compose = {key.removeprefix("CONNECT_").lower().replace("_", "."): value
               for key, value in env.items() if key.startswith("CONNECT_PRODUCER_")}
    native = {k: str(v) for k, v in ConnectService(Settings(state_dir=tmp_path)).worker_properties().items()
              if k.startswith("producer.")}
    assert native == {"producer.batch.size": "262144", "producer.linger.ms": "5", "producer.compression.type": "lz4"}
    assert compose == native


def test_connect_resolves_every_env_reference_in_the_connector_files(model: dict) -> None:
    env = _env(_service(model, "connect"))
    pattern = env["CONNECT_CONFIG_PROVIDERS_ENV_PARAM_ALLOWLIST_PATTERN"]
    files = sorted((REPO / "changeflow" / "connectors").glob("*.json"))
    assert files, "no connector files in connectors/"
    for path in files:
        for name in re.findall(r"\$\{env:([A-Za-z0-9_]+)\}", path.read_text()):
            assert name in env, f"{path.name} reads ${{env:{name}}}, which the connect service lacks"
            assert re.fullmatch(pattern, name), f"{name} is outside the provider's allowlist"
            assert env[name], f"{name} is empty in the connect service"


def test_derived_stores(model: dict) -> None:
    assert re.fullmatch(r"redis:7(\..+)?", _service(model, "redis")["image"])
    es = _service(model, "elasticsearch")
    # elasticsearch-py only talks to a server of its own major version (compatible-with header).
    assert re.fullmatch(r"docker\.elastic\.co/elasticsearch/elasticsearch:9\..+", es["image"])
    assert _env(es)["discovery.type"] == "single-node"
    assert _env(es)["xpack.security.enabled"] == "false"
    ch = _service(model, "clickhouse")
    assert ch["image"].startswith("clickhouse/clickhouse-server:")
    assert _env(ch)["CLICKHOUSE_DB"] == "changeflow"
    assert "changeflow" in _healthcheck_text(ch)


def test_worker_is_built_here_and_configured_through_settings(model: dict) -> None:
    worker = _service(model, "worker")
    dockerfile = Path(worker["build"]["context"]) / worker["build"]["dockerfile"]
    assert dockerfile == REPO / "changeflow" / "deploy" / "docker" / "Dockerfile"
    text = dockerfile.read_text()
    assert "python:3.11-slim" in text and "pip " in text
    assert 'CMD ["changeflow", "worker"]' in text
    assert worker["command"] == ["changeflow", "worker"]

    env = _env(worker)
    # The core settings, each store's connection settings and the stack servers' (the same variables).
    classes = [Settings, RedisSettings, SearchSettings, ClickHouseSettings, PostgresStoreSettings,
               RedisServerSettings, SearchServerSettings, ClickHouseServerSettings]
    known = {variable(cls, field) for cls in classes for field in cls.model_fields}
    for key in env:
        if key.startswith("CHANGEFLOW_"):
            assert key in known, f"{key} is not a field of any settings class"
    # Every *_HOST names a service, and the matching *_PORT is one that service listens on.
    for key, host in env.items():
        if not (key.startswith("CHANGEFLOW_") and key.endswith("_HOST")):
            continue
        if key == "CHANGEFLOW_WORKER_WEB_HOST":
            assert host == "0.0.0.0", "the worker's web port must listen beyond loopback inside its container"
            continue
        assert host in model["services"], f"{key}={host} is not a service"
        port = env[key.removesuffix("_HOST") + "_PORT"]
        target = model["services"][host]
        listens = {str(p) for p in _published(target)} | set(
            re.findall(r":(\d+)", _env(target).get("KAFKA_LISTENERS", ""))
        )
        assert port in listens, f"{key}={host} but port {port} is not one {host} listens on"
    assert env["CHANGEFLOW_SEARCH_HOST"] == "elasticsearch"
    assert env["CHANGEFLOW_CLICKHOUSE_DATABASE"] == _env(model["services"]["clickhouse"])["CLICKHOUSE_DB"]
    assert env["CHANGEFLOW_PG_DATABASE"] == _env(model["services"]["postgres"])["POSTGRES_DB"]


def test_prometheus_scrapes_the_worker_and_grafana_shows_the_provisioned_dashboard(model: dict) -> None:
    prometheus, grafana = _service(model, "prometheus"), _service(model, "grafana")
    assert prometheus["image"].startswith("prom/prometheus:v3.")
    assert grafana["image"].startswith("grafana/grafana:")
    assert _published(prometheus)[9090] == ("127.0.0.1", 9090)
    assert _published(grafana)[3000] == ("127.0.0.1", 3000)

    def binds(service: dict) -> dict[str, Path]:
        return {v["target"]: Path(v["source"]) for v in service["volumes"] if v["type"] == "bind"}

    # The scrape config the container reads is the repo's, and it targets the worker's web port by its
    # service name, at the path the worker serves.
    flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config = binds(prometheus)[flag.split("=", 1)[1]]
    assert config == REPO / "changeflow" / "deploy" / "docker" / "prometheus" / "prometheus.yml"
    worker_port = _env(model["services"]["worker"])["CHANGEFLOW_WORKER_WEB_PORT"]
    text = config.read_text()
    assert f'targets: ["worker:{worker_port}"]' in text and "metrics_path: /metrics" in text

    # Grafana: provisioning and dashboards from the repo; the datasource is this compose's Prometheus,
    # and the dashboard provider reads the directory the dashboards are mounted at.
    mounts = binds(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    assert provisioning == REPO / "changeflow" / "deploy" / "docker" / "grafana" / "provisioning"
    assert "url: http://prometheus:9090" in (provisioning / "datasources" / "prometheus.yml").read_text()
    provider = (provisioning / "dashboards" / "changeflow.yml").read_text()
    dashboards_target = re.search(r"path:\s*(\S+)", provider)
    assert dashboards_target is not None
    assert mounts[dashboards_target.group(1)] == REPO / "changeflow" / "deploy" / "docker" / "grafana" / "dashboards"
    assert json.loads((mounts[dashboards_target.group(1)] / "changeflow.json").read_text())["panels"]
    env = _env(grafana)
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"  # anonymous visitors read, never edit
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == SECRETS["CHANGEFLOW_GRAFANA_ADMIN_PASSWORD"]


def test_images_are_pinned(model: dict) -> None:
    for name, service in model["services"].items():
        if "build" in service:
            continue
        image = service["image"]
        tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag and tag != "latest", f"{name}: {image} is not pinned"


def test_compose_check_script_is_valid_shell() -> None:
    subprocess.run(["bash", "-n", str(CHECK)], check=True)
