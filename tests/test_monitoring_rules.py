"""deploy/monitoring: the alerting rules pass promtool's checks and their unit tests, every
alert is tested both ways, and the rules and the Grafana dashboard name only metrics, statuses
and stages the daemons export (no Prometheus server or Grafana needed; promtool comes from
Debian's prometheus package, fetched by check.sh when missing).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from invoker.metrics import STAGES, Metrics
from invoker.model import Status

MONITORING = Path(__file__).resolve().parents[1] / "deploy" / "monitoring"
RULES = MONITORING / "rules.yml"
RULES_TEST = MONITORING / "rules_test.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
CHECK_TIMEOUT_S = 900  # the first run may download the prometheus package (check.sh: <= 720 s)
METRIC_NAME = re.compile(r"\b(?:invoker|process)_[a-z0-9_]+\b")


def run_check(directory: Path) -> subprocess.CompletedProcess[str]:
    """check.sh in its own session: on timeout its whole process group (apt, promtool) is
    killed, not only the shell."""
    args = [str(directory / "check.sh")]
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=CHECK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def checked() -> subprocess.CompletedProcess[str]:
    """check.sh on the repository's files, once (it leaves promtool cached for the others)."""
    return run_check(MONITORING)


def alert_blocks() -> dict[str, str]:
    """Each alert of rules.yml → its text (no YAML parser among the dependencies)."""
    blocks = re.split(r"\n\s+- alert: ", RULES.read_text())[1:]
    return {block.split("\n", 1)[0].strip(): block for block in blocks}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"]
            for target in panel.get("targets", [])]


def test_promtool_checks_and_rule_tests_pass(checked) -> None:
    output = checked.stdout + checked.stderr
    assert checked.returncode == 0, output
    assert "Unit Testing:  rules_test.yml\n  SUCCESS" in checked.stdout, output
    assert f"SUCCESS: {len(alert_blocks())} rules found" in checked.stdout, output
    assert f"SUCCESS: {len(dashboard_queries())} rules found" in checked.stdout, output


@pytest.mark.parametrize(("name", "before", "after", "says"), [
    # an alert that fires a minute earlier than its unit test expects
    ("rules.yml", "for: 2m", "for: 1m", "FAILED"),
    ("rules.yml", "> 0.05", "> 0.005", "FAILED"),
    ("prometheus.yml", "type: A", "type: B", "FAILED"),
    ("grafana-dashboard.json", "histogram_quantile(0.5, sum", "histogram_quantile(0.5 sum",
     "parse error"),
])
def test_check_fails_when_a_file_is_wrong(checked, tmp_path: Path, name: str, before: str,
                                          after: str, says: str) -> None:
    copy = tmp_path / "monitoring"
    shutil.copytree(MONITORING, copy)
    text = (copy / name).read_text()
    assert before in text
    (copy / name).write_text(text.replace(before, after, 1))
    result = run_check(copy)
    assert result.returncode != 0, result.stdout
    assert says in result.stdout + result.stderr


def test_every_alert_has_a_delay_a_severity_a_text_and_tests_both_ways() -> None:
    alerts = alert_blocks()
    assert len(alerts) >= 9
    for name, block in alerts.items():
        assert re.search(r"\n\s+for: \d+[smh]\n", block), name
        assert re.search(r"\n\s+severity: (critical|warning|info)\n", block), name
        assert re.search(r"\n\s+summary: \S", block), name
        assert re.search(r"\n\s+description: >-\n\s+\S", block), name
    fires, quiet = set(), set()
    for case in RULES_TEST.read_text().split("- eval_time:")[1:]:
        name = re.search(r"alertname: (\w+)", case).group(1)
        assert name in alerts, f"rules_test.yml tests {name}, which rules.yml lacks"
        if re.search(r"exp_alerts: \[\]", case):
            quiet.add(name)
        else:
            assert re.search(r"exp_alerts:\n\s+- exp_labels:", case), case
            fires.add(name)
    assert fires == set(alerts), f"never seen firing: {set(alerts) - fires}"
    assert quiet == set(alerts), f"never seen quiet: {set(alerts) - quiet}"


def test_only_exported_metrics_statuses_and_stages_are_named() -> None:
    # names of the samples, also of labelled metrics with no child yet (no samples)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    exported = set()
    for family in Metrics().registry.collect():
        exported.add(family.name)
        exported.update(family.name + suffix for suffix in suffixes.get(family.type, ()))
        exported.update(sample.name for sample in family.samples)
    texts = {"rules.yml": RULES.read_text(), "rules_test.yml": RULES_TEST.read_text(),
             "grafana-dashboard.json": "\n".join(dashboard_queries())}
    statuses = {status.label for status in Status}
    for name, text in texts.items():
        named = set(METRIC_NAME.findall(text))
        assert named, name
        assert named <= exported, f"{name} names unknown metrics: {named - exported}"
        assert set(re.findall(r'status="([^"]*)"', text)) <= statuses, name
        assert set(re.findall(r'stage="([^"]*)"', text)) <= set(STAGES), name
    # the dashboard shows every metric family the daemons export
    shown = set(METRIC_NAME.findall(texts["grafana-dashboard.json"]))
    families = {family.name for family in Metrics().registry.collect()
                if family.name.startswith("invoker_")}
    missing = {f for f in families if not any(s == f or s.startswith(f + "_") for s in shown)}
    assert not missing, f"metrics the dashboard does not show: {missing}"


def test_the_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    builtins = {"__rate_interval", "__interval", "__range"}
    ids, cells = set(), set()
    for panel in board["panels"]:
        assert panel["id"] not in ids, panel["title"]
        ids.add(panel["id"])
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            used = set(re.findall(r"\$(\w+)", target["expr"]))
            assert used <= set(variables) | builtins, (panel["title"], used)
