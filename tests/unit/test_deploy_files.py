"""deploy/: the alert rules and the Grafana dashboard use only metric names that the code exports."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sandbox_backup.runner.app import create_app as create_runner_app
from sandbox_backup.runner.settings import RunnerSettings

DEPLOY = pathlib.Path(__file__).resolve().parents[2] / "deploy"
ALERTS = DEPLOY / "prometheus-alerts.yml"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
METRIC_NAME_RE = re.compile(r"\bsandbox_backup_[a-zA-Z0-9_:]*")

# Series names that each metric type writes, per the Prometheus text format.
SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "untyped": ("",),
}


def _series_names(exposition: str) -> set[str]:
    """Series names that the exposition declares, also for metrics that have no sample yet.

    The parser strips the type's suffix from a family name (a counter's `_total`), so the
    suffixes are added back by type instead of being guessed from the sample lines.
    """
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in SERIES_SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return names


async def _exported_names(api: httpx.AsyncClient, tmp_path: pathlib.Path) -> set[str]:
    manager_response = await api.get("/metrics")
    assert manager_response.status_code == 200

    settings = RunnerSettings(runner_id="r1", token="agent-token", state_path=tmp_path / "state.db", docker_host="unix:///nonexistent/docker.sock")
    transport = httpx.ASGITransport(app=create_runner_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://runner") as client:
        runner_response = await client.get("/metrics")
    assert runner_response.status_code == 200

    return _series_names(manager_response.text) | _series_names(runner_response.text)


def _alert_rules() -> list[dict[str, object]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_series_names_from_types() -> None:
    registry = CollectorRegistry()
    Counter("a", "counter without samples", ["outcome"], registry=registry)
    Histogram("b", "histogram without samples", ["job"], registry=registry)
    Gauge("c", "gauge", registry=registry).set(2)

    names = _series_names(generate_latest(registry).decode())
    assert {"a_total", "b_bucket", "b_sum", "b_count", "c"} <= names
    assert "a" not in names
    assert "b" not in names


def test_alert_rules_structure() -> None:
    document = yaml.safe_load(ALERTS.read_text())
    assert isinstance(document["groups"], list)
    for group in document["groups"]:
        assert group["name"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"])
            assert isinstance(rule["expr"], str)
            assert rule["expr"].strip()
            assert re.fullmatch(r"\d+[smhd]", rule.get("for", "0s"))
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"]


def test_alert_rules_cover_required_cases() -> None:
    expressions = {rule["alert"]: rule["expr"] for rule in _alert_rules()}
    assert "sandbox_backup_newest_backup_age_max_seconds" in expressions["SandboxBackupOlderThanRpo"]
    assert "sandbox_backup_attempts_total" in expressions["SandboxBackupErrorRateHigh"]
    assert "sandbox_backup_deletions_owed" in expressions["SandboxBackupDeletionsOwedGrowing"]
    assert "sandbox_backup_registry_up" in expressions["SandboxBackupRegistryUnavailable"]
    assert "UNRESPONSIVE" in expressions["SandboxBackupRunnerUnreachable"]


def test_dashboard_panels_have_targets() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"]
    panel_ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(panel_ids) == len(set(panel_ids))
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]


async def test_deploy_files_use_exported_names(api: httpx.AsyncClient, tmp_path: pathlib.Path) -> None:
    exported = await _exported_names(api, tmp_path)
    sources = {f"alert {rule['alert']}": rule["expr"] for rule in _alert_rules()}
    sources.update({f"dashboard expr {index}": expr for index, expr in enumerate(_dashboard_expressions())})

    for source, expression in sources.items():
        used = set(METRIC_NAME_RE.findall(expression))
        assert used, f"{source} uses no sandbox_backup_ metric: {expression}"
        unknown = used - exported
        assert not unknown, f"{source} uses metric names that no /metrics exports: {sorted(unknown)}"


def test_promtool_accepts_alert_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
