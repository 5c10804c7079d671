"""Connector registration through the real Kafka Connect REST API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from changeflow.connectors.client import ConnectorConfigError, ConnectorDefinition, KafkaConnectClient, default_files
from changeflow.settings import Settings

pytestmark = pytest.mark.integration


def test_applying_the_connector_twice_changes_nothing(pipeline: Settings, connect: KafkaConnectClient) -> None:
    definition = ConnectorDefinition.load(default_files()[0])
    before = connect.status(definition.name)
    config_before = connect.get_config(definition.name)
    assert connect.apply(definition) == "unchanged"
    assert connect.get_config(definition.name) == config_before
    after = connect.wait_running(definition.name, timeout=60)
    assert before is not None
    assert after["connector"]["state"] == "RUNNING"
    assert [t["id"] for t in after["tasks"]] == [t["id"] for t in before["tasks"]]
    # The secret stays a reference in what Connect stores.
    assert config_before is not None
    assert config_before["database.password"] == "${env:CHANGEFLOW_PG_REPLICATION_PASSWORD}"


def test_cli_apply_is_idempotent_and_prints_state(pipeline: Settings) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "changeflow", "connectors", "apply"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "commerce-postgres" in result.stdout
    assert "unchanged" in result.stdout
    assert "RUNNING" in result.stdout


def test_bad_setting_is_rejected_with_connects_message_and_nothing_registered(
    live_stack: Settings, connect: KafkaConnectClient, tmp_path: Path
) -> None:
    data = json.loads(default_files()[0].read_text())
    data["name"] = "bad-snapshot-mode-test"
    data["config"]["snapshot.mode"] = "sometimes"
    data["config"]["slot.name"] = "bad_snapshot_mode_test"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))

    with pytest.raises(ConnectorConfigError) as caught:
        connect.apply(ConnectorDefinition.load(bad))
    assert "snapshot.mode" in caught.value.errors
    message = " ".join(caught.value.errors["snapshot.mode"])
    assert message.startswith("The 'snapshot.mode' value is invalid: Value must be one of")
    assert "initial" in message
    assert "bad-snapshot-mode-test" not in connect.list()

    result = subprocess.run(
        [sys.executable, "-m", "changeflow", "connectors", "apply", str(bad)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert "rejected by Kafka Connect validation" in result.stderr
    assert "The 'snapshot.mode' value is invalid" in result.stderr
    assert "bad-snapshot-mode-test" not in connect.list()
