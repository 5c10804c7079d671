"""Kafka Connect REST client: validate, then create or update, then wait for RUNNING.

Connector definitions are data: files in Kafka Connect's own JSON form (``{"name": ..., "config":
{...}}``) that can equally be sent with ``curl``. Secrets stay references (``${env:...}``) that the
Connect worker resolves through its config providers.

A definition is first checked by Connect's own validator (``PUT
/connector-plugins/{class}/config/validate``); if any setting has errors nothing is registered.
Applying an unchanged definition does not touch the running connector.
"""

from __future__ import annotations

import contextlib
import json
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from changeflow.waiting import WaitTimeout, wait_until

CONNECTOR_DIR = Path(__file__).parent


class ConnectorConfigError(ValueError):
    """Connect's validator rejected the definition; nothing was registered."""

    def __init__(self, name: str, errors: dict[str, list[str]]) -> None:
        self.name = name
        self.errors = errors
        lines = [f"{key}: {'; '.join(msgs)}" for key, msgs in errors.items()]
        super().__init__(f"connector {name!r} rejected by Kafka Connect validation:\n  " + "\n  ".join(lines))


class ConnectorFailedError(RuntimeError):
    """The connector or one of its tasks is FAILED; carries Connect's trace."""


class ConnectUnavailableError(RuntimeError):
    pass


@dataclass
class ConnectorDefinition:
    name: str
    config: dict[str, str]
    path: Path | None = None

    @property
    def connector_class(self) -> str:
        return self.config["connector.class"]

    @classmethod
    def load(cls, path: Path) -> ConnectorDefinition:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or "name" not in data or not isinstance(data.get("config"), dict):
            raise ValueError(f'{path}: expected Kafka Connect\'s form {{"name": ..., "config": {{...}}}}')
        config = {str(k): str(v) for k, v in data["config"].items()}
        if "connector.class" not in config:
            raise ValueError(f"{path}: config has no connector.class")
        return cls(name=str(data["name"]), config=config, path=path)


@dataclass
class ApplyResult:
    name: str
    action: str  # "created", "updated" or "unchanged"
    state: dict[str, Any] = field(default_factory=dict)


def default_files() -> list[Path]:
    """The connectors the native stack runs (MongoDB runs only under docker-compose)."""
    return [CONNECTOR_DIR / "postgres-commerce.json"]


_retriable = retry(
    retry=retry_if_exception_type(ConnectUnavailableError),
    wait=wait_exponential(multiplier=0.3, max=5),
    stop=stop_after_delay(60),
    reraise=True,
)


def _path(name: str) -> str:
    """A connector name as one URL path segment (names come from files: never unquoted into a URL)."""
    return urllib.parse.quote(name, safe="")


class KafkaConnectClient:
    def __init__(self, url: str, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    @_retriable
    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ConnectUnavailableError(f"Kafka Connect at {self.url} unreachable: {exc}") from exc
        # 409: a worker rebalance is in progress; Connect asks to retry.
        if response.status_code in (409, 503, 504):
            raise ConnectUnavailableError(f"Kafka Connect busy ({response.status_code}): {response.text[:300]}")
        return response

    def validate(self, definition: ConnectorDefinition) -> dict[str, list[str]]:
        """Connect's validator's errors per setting; empty when the config is valid."""
        plugin = definition.connector_class.rsplit(".", 1)[-1]
        response = self._request(
            "PUT", f"/connector-plugins/{plugin}/config/validate", json={**definition.config, "name": definition.name}
        )
        if response.status_code == 404 or response.status_code >= 500:
            raise ConnectorConfigError(
                definition.name, {"connector.class": [f"{definition.connector_class}: {response.text[:500]}"]}
            )
        response.raise_for_status()
        errors: dict[str, list[str]] = {}
        for item in response.json().get("configs", []):
            value = item.get("value", {})
            if value.get("errors"):
                errors[value["name"]] = list(value["errors"])
        return errors

    def get_config(self, name: str) -> dict[str, str] | None:
        response = self._request("GET", f"/connectors/{_path(name)}/config")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return {str(k): str(v) for k, v in response.json().items()}

    def put_config(self, definition: ConnectorDefinition) -> str:
        response = self._request("PUT", f"/connectors/{_path(definition.name)}/config", json=definition.config)
        if response.status_code >= 400:
            raise ConnectorFailedError(f"PUT config of {definition.name} failed: {response.text[:2000]}")
        return "created" if response.status_code == 201 else "updated"

    def status(self, name: str) -> dict[str, Any] | None:
        response = self._request("GET", f"/connectors/{_path(name)}/status")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return,unused-ignore]

    def list(self) -> list[str]:
        response = self._request("GET", "/connectors")
        response.raise_for_status()
        return list(response.json())

    def forget_offsets(self, name: str, timeout: float = 60.0) -> bool:
        """Stop the connector and delete its source offsets (Kafka Connect 3.6+), so a connector created
        again under this name snapshots from the start instead of resuming where this one stopped."""
        if self._request("PUT", f"/connectors/{_path(name)}/stop").status_code not in (200, 202, 204):
            return False
        with contextlib.suppress(WaitTimeout):  # the offsets call then says what Connect thinks
            wait_until(lambda: (self.status(name) or {}).get("connector", {}).get("state") == "STOPPED", timeout,
                       what=f"connector {name} STOPPED")
        return self._request("DELETE", f"/connectors/{_path(name)}/offsets").status_code in (200, 204)

    def delete(self, name: str) -> bool:
        response = self._request("DELETE", f"/connectors/{_path(name)}")
        return response.status_code in (200, 204)

    def apply(self, definition: ConnectorDefinition) -> str:
        """Validate, then create or update; returns created/updated/unchanged."""
        errors = self.validate(definition)
        if errors:
            raise ConnectorConfigError(definition.name, errors)
        current = self.get_config(definition.name)
        desired = {**definition.config, "name": definition.name}
        if current is not None and current == desired:
            return "unchanged"
        return self.put_config(definition)

    def wait_running(
        self,
        name: str,
        timeout: float = 120.0,
        on_poll: Callable[[dict[str, Any] | None], None] | None = None,
    ) -> dict[str, Any]:
        """Until the connector and all its tasks are RUNNING; a FAILED one raises with its trace."""
        last: list[dict[str, Any] | None] = [None]

        def running() -> dict[str, Any] | None:
            state = last[0] = self.status(name)
            if on_poll:
                on_poll(state)
            if state is None:
                return None
            failed = [t for t in [state.get("connector", {}), *state.get("tasks", [])] if t.get("state") == "FAILED"]
            if failed:
                trace = failed[0].get("trace", "(no trace)")
                raise ConnectorFailedError(f"connector {name} FAILED:\n{trace}")
            tasks = state.get("tasks", [])
            if state.get("connector", {}).get("state") == "RUNNING" and tasks and all(
                t.get("state") == "RUNNING" for t in tasks
            ):
                return state
            return None

        return wait_until(running, timeout, what=f"connector {name} RUNNING", interval=1.0, error=lambda _: (
            ConnectorFailedError(f"connector {name} not RUNNING after {timeout:.0f}s; last status: {last[0]}")))
