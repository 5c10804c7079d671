"""The core typed settings object, and the way every other settings class reads the environment.

Loaded once by the CLI (``Settings()`` reads ``CHANGEFLOW_*`` environment variables and ``.env``) and
passed down. What is a store's own (where its server is, its password) is in that store module's settings
class (``changeflow.sinks.<store>``, ``CHANGEFLOW_<STORE>_*``), and where the local stack's servers listen in
its module of ``changeflow.deploy``; each reads the same ``.env`` files through :func:`env_config`, so a
variable set once reaches every reader of it.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from pydantic import SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The checkout this package runs from (an editable install, as `make` sets up): its `.changeflow/` is the
# default state directory whatever the current folder is.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# `.env` beside the project, then in the current folder (which wins).
ENV_FILES = (PROJECT_ROOT / ".env", ".env")


def env_config(prefix: str) -> SettingsConfigDict:
    """The configuration of a settings class whose fields are ``<prefix><FIELD>`` variables."""
    return SettingsConfigDict(env_prefix=prefix, env_file=ENV_FILES, extra="ignore")


class Settings(BaseSettings):
    model_config = env_config("CHANGEFLOW_")

    # Where the native local stack keeps binaries, data, logs and pid files, and the worker its Faust data and
    # its last fatal error: CHANGEFLOW_STATE_DIR (a relative one is taken from the folder it is set in), else
    # the project root's `.changeflow/`. Resolved once, to an absolute path, when the settings load.
    state_dir: Path = PROJECT_ROOT / ".changeflow"
    # The pipeline file every command uses (`changeflow --pipeline FILE` wins); unset: the commerce example.
    pipeline: Path | None = None

    # PostgreSQL (the source of truth for commerce entities).
    pg_host: str = "127.0.0.1"
    pg_port: int = 5432
    pg_database: str = "commerce"
    pg_superuser: str = "postgres"
    # Every TCP connection to the stack's PostgreSQL needs a password (scram), the superuser's included.
    # Unset: the native stack generates one under <state_dir>/secrets/pg_superuser_password.
    pg_superuser_password: SecretStr | None = None
    # Debezium's replication role; its password is passed to Kafka Connect through the
    # environment (EnvVarConfigProvider), never written into a committed file. Unset: the native stack
    # generates one under <state_dir>/secrets/ (changeflow/deploy/secrets.py).
    pg_replication_user: str = "debezium"
    pg_replication_password: SecretStr | None = None

    # Kafka and Kafka Connect.
    kafka_host: str = "127.0.0.1"
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    connect_port: int = 8083
    connect_host: str = "127.0.0.1"

    @field_validator("state_dir")
    @classmethod
    def _absolute_state_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    def stored_secret(self, name: str) -> SecretStr | None:
        """A secret the native stack generated under ``<state_dir>/secrets/`` (deploy/secrets.py), if any."""
        try:
            stored = (self.state / "secrets" / name).read_text().strip()
        except OSError:
            return None
        return SecretStr(stored) if stored else None

    @model_validator(mode="after")
    def _passwords_from_state(self) -> Settings:
        if self.pg_superuser_password is None:
            self.pg_superuser_password = self.stored_secret("pg_superuser_password")
        if self.erasure_key is None:
            self.erasure_key = self.stored_secret("erasure_key")
        if self.erasure_token is None:
            self.erasure_token = self.stored_secret("erasure_token")
        return self

    # Erasure (README "Erasure"). The key of the marks (HMACs) that stand for an erased person in requests and
    # the suppression list: every process of one deployment must share it. The token the worker's erasure
    # endpoint requires (`Authorization: Bearer <token>`). Unset: the native stack generates both under
    # <state_dir>/secrets/.
    erasure_key: SecretStr | None = None
    erasure_token: SecretStr | None = None

    # Worker.
    worker_web_host: str = "127.0.0.1"
    worker_web_port: int = 6066
    sink_batch_size: int = 5000
    # The longest a sink waits to fill a batch: it bounds the latency a quiet stream adds. Measured
    # (2026-12-02, two runs each): 50 -> 20 ms cut freshness p50 by ~20 ms in Redis and ClickHouse at 1k/s and
    # p99 at 5k/s by 60-250 ms, for ~6 % of backlog throughput (smaller bulks to the search engine).
    sink_batch_timeout_s: float = 0.02
    # How long a sink waits, its batch uncommitted, for a canonical record's schema version that is not on the
    # schema topic yet (re-reading it with backoff). The decode stage publishes a version before its first
    # record, so one still missing after this is no version of the pipeline (corrupted bytes): a dead letter.
    # A schema topic that cannot be read is waited for without a bound.
    sink_schema_wait_s: float = 10.0

    # How long `stack up` waits for one service to become healthy.
    start_timeout_s: float = 180.0

    @property
    def state(self) -> Path:
        return self.state_dir

    @property
    def pg_dsn(self) -> str:
        """The stack's superuser on its database, with its password (the DSN is a secret: never logged)."""
        user = quote(self.pg_superuser, safe="")
        if self.pg_superuser_password is not None:
            user += ":" + quote(self.pg_superuser_password.get_secret_value(), safe="")
        return f"postgresql://{user}@{self.pg_host}:{self.pg_port}/{quote(self.pg_database, safe='')}"

    @property
    def kafka_bootstrap(self) -> str:
        return f"{self.kafka_host}:{self.kafka_port}"

    @property
    def connect_url(self) -> str:
        return f"http://{self.connect_host}:{self.connect_port}"
