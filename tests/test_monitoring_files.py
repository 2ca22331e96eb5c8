"""The monitoring and deployment files against a real relay and the real tools.

Every relay_* series that the alert rules and the Grafana dashboard query, with the label
names and values they match on, must appear in the /metrics of a relay that has just
delivered, deferred and refused mail. promtool (Debian: `apt-get install prometheus`)
checks the PromQL and runs the alerts on made-up series; systemd-analyze checks the unit.
Each tool's test is skipped, saying why, where the tool is missing.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from relay.cli.commands import EXIT_USAGE
from relay.config.loading import load_config
from relay.observe.metrics import REJECT_REASONS
from relay.queue.types import MessageState
from tests.conftest import (
    StartRelay,
    message,
    metric,
    relay_config,
    send,
    upstream_account,
    wait_until,
    webhook_block,
)
from tests.upstream import FakeUpstream
from tests.webhook import WebhookReceiver

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "config" / "prometheus-alerts.yml"
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"
UNIT = ROOT / "config" / "relay.service"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
COMPOSE_RELAY = ROOT / "deploy" / "relay.yaml"  # mounted over the image's config
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
MONITORING_DOC = ROOT / "docs" / "monitoring.md"

METRIC = re.compile(r"\brelay_[a-z_]+\b")
SELECTOR = re.compile(r"\b(relay_[a-z_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
# Labels that Prometheus adds at scrape time (instance, job) or that histograms carry.
TARGET_LABELS = {"instance", "job", "le"}


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _strings_under(node: Any, keys: set[str]) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in keys and isinstance(value, str):
                yield value
            else:
                yield from _strings_under(value, keys)
    elif isinstance(node, list):
        for item in node:
            yield from _strings_under(item, keys)


def dashboard_exprs() -> list[str]:
    """The PromQL of every panel target and every query variable."""
    doc = json.loads(DASHBOARD.read_text())
    exprs = list(_strings_under(doc["panels"], {"expr"}))
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


def as_promql(expr: str) -> str:
    """A dashboard expression as plain PromQL: Grafana's variables given example values."""
    if expr.startswith("label_values("):
        expr = expr.removeprefix("label_values(").rsplit(",", 1)[0]
    for var, value in (("$__rate_interval", "1m"), ("$__range", "6h"),
                       ("$instance", ".*"), ("$account", ".*")):
        expr = expr.replace(var, value)
    return expr


# -- a short real run ---------------------------------------------------------------


@pytest.fixture
async def exposition(upstream: FakeUpstream, start_relay: StartRelay, webhook: WebhookReceiver,
                     tmp_path: Path) -> dict[str, list[dict[str, str]]]:
    """Sample name -> label sets, from GET /metrics of a relay that has done some work."""
    config = relay_config(tmp_path, {
        "main": upstream_account(upstream, tmp_path),
        "outbox": {"transport": "maildir", "path": str(tmp_path / "outbox"),
                   "rate_limit": {"per_day": 1000}},  # relay_account_quota_remaining
    }, events={"webhooks": [webhook_block(webhook, tmp_path)]})
    app = await start_relay(config)
    upstream.fail_data(451, "4.3.0 try again later", times=1)
    for i in range(3):
        assert (await send(app.smtp_port, message(f"m{i}")))[0] == 250
    assert (await send(app.smtp_port, message("o", headers={"X-Account": "outbox"})))[0] == 250
    code, _ = await send(app.smtp_port, message("x", headers={"X-Account": "nope"}))
    assert code == 550
    await wait_until(lambda: metric(app, "relay_messages_delivered_total", account="main") == 3
                     and metric(app, "relay_messages_delivered_total", account="outbox") == 1,
                     what="3 deliveries through main (one after a retry), 1 through outbox")

    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{app.http_port}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    samples: dict[str, list[dict[str, str]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append(dict(sample.labels))

    def value(name: str, **labels: str) -> float:
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and labels.items() <= s.labels.items())

    # The run did what it was meant to, as /metrics reports it.
    assert value("relay_messages_delivered_total", account="main") == 3
    assert value("relay_messages_delivered_total", account="outbox") == 1
    assert value("relay_messages_deferred_total", account="main") == 1
    assert value("relay_messages_rejected_total", reason="unknown_account") == 1
    assert value("relay_queue_messages", account="main", state="delivered") == 3
    assert value("relay_upstream_connections_opened_total", account="main") >= 1
    # Every attempt that reached a transaction: 3 delivered + the 1 deferred.
    assert value("relay_delivery_duration_seconds_count", account="main") == 4
    return dict(samples)


def check_against(exprs: list[str], samples: dict[str, list[dict[str, str]]]) -> None:
    """Every relay_* name, label and matched label value in ``exprs`` exists in ``samples``."""
    problems: list[str] = []
    for expr in exprs:
        names = set(METRIC.findall(expr))
        if not names:
            continue  # up{...}, probe_success{...}: series of Prometheus and blackbox
        for name in sorted(names - samples.keys()):
            problems.append(f"{name} is not in relay's /metrics  [{expr}]")
        for name, matchers in SELECTOR.findall(expr):
            for label, op, value in MATCHER.findall(matchers):
                if label in TARGET_LABELS or name not in samples:
                    continue
                values = {s[label] for s in samples[name] if label in s}
                if not values:
                    problems.append(f"{name} has no label {label!r}  [{expr}]")
                elif "$" not in value and op in ("=", "=~", "!~"):
                    alternatives = value.split("|") if op in ("=~", "!~") else [value]
                    problems += [f"{name} never has {label}={alt!r} (it has {sorted(values)})"
                                 for alt in alternatives if alt not in values]
        labels_here = {k for n in names if n in samples for s in samples[n] for k in s}
        for grouping in GROUPING.findall(expr):
            for label in (part.strip() for part in grouping.split(",")):
                if label and label not in TARGET_LABELS | labels_here:
                    problems.append(f"by/without ({label}): no such label  [{expr}]")
    assert not problems, "\n".join(problems)


async def test_alert_rules_query_only_what_relay_exports(
    exposition: dict[str, list[dict[str, str]]],
) -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "RelayDown", "RelayNotReady", "RelayBacklogGrowing", "RelayOldestMessageTooOld",
        "RelayDeliveryErrors", "RelayUpstreamAuthFailing",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    check_against([r["expr"] for r in rules], exposition)


async def test_dashboard_queries_only_what_relay_exports(
    exposition: dict[str, list[dict[str, str]]],
) -> None:
    exprs = dashboard_exprs()
    check_against(exprs, exposition)
    # Only relay's own series: no up{}, no node exporter, nothing the relay job lacks.
    for expr in exprs:
        assert METRIC.search(expr), f"a dashboard query that reads no relay metric: {expr}"
    # ... and all of them: each exported family has a panel.
    shown = {m for e in exprs for m in METRIC.findall(e)}
    exported = {re.sub(r"_(bucket|sum|count)$", "", n) for n in exposition
                if not n.endswith("_created")}
    assert not [n for n in exported
                if not any(s == n or s.startswith(n + "_") for s in shown)]


async def test_monitoring_doc_describes_every_metric(
    exposition: dict[str, list[dict[str, str]]],
) -> None:
    doc = MONITORING_DOC.read_text()
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in exposition
                if not n.endswith("_created")}
    assert not [f for f in sorted(families) if f"`{f}" not in doc]
    assert not [r for r in REJECT_REASONS if f"`{r}`" not in doc]
    assert not [s for s in MessageState if f"`{s}`" not in doc]


def test_dashboard_is_importable_grafana_json() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"] and isinstance(doc["schemaVersion"], int)
    panel_ids = [p["id"] for p in doc["panels"]]
    assert len(panel_ids) == len(set(panel_ids))
    variables = {v["name"] for v in doc["templating"]["list"]}
    for panel in doc["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval", "__range"}
            assert used <= variables, (panel["title"], used)


def test_dashboard_and_docs_agree_that_failed_attempts_are_timed() -> None:
    """The scheduler observes failed attempts too (see `exposition`: 3 delivered + 1 deferred
    make a count of 4); the duration panel and docs/monitoring.md must both say so."""
    doc = json.loads(DASHBOARD.read_text())
    (panel,) = [p for p in doc["panels"] if any(
        "relay_delivery_duration_seconds" in t["expr"] for t in p.get("targets", []))]
    (row,) = [line for line in MONITORING_DOC.read_text().splitlines()
              if line.startswith("| `relay_delivery_duration_seconds` |")]
    for text in (panel["description"], row):
        assert "failed ones included" in text
        assert "not included" not in text


# -- deployment files ---------------------------------------------------------------


def test_compose_publishes_on_loopback_and_mounts_the_rules() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    build = services["relay"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file()
    mounts = {}
    for volume in services["prometheus"]["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            assert (COMPOSE.parent / source).is_file(), volume
            mounts[target] = (COMPOSE.parent / source).resolve()
    assert mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS.resolve()
    prometheus = yaml.safe_load(PROMETHEUS.read_text())
    (rule_file,) = prometheus["rule_files"]
    assert mounts[f"/etc/prometheus/{rule_file}"] == ALERTS.resolve()
    # The job names the alerts select on, and targets that exist in the compose project.
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    docker_config = yaml.safe_load(COMPOSE_RELAY.read_text())
    assert jobs["relay"]["static_configs"][0]["targets"] == [
        f"relay:{docker_config['metrics']['port']}"
    ]
    assert docker_config["metrics"]["host"] == "0.0.0.0"
    probe_target = jobs["relay-readyz"]["static_configs"][0]["targets"][0]
    assert probe_target == f"http://relay:{docker_config['metrics']['port']}/readyz"
    address = jobs["relay-readyz"]["relabel_configs"][-1]["replacement"]
    assert address.split(":")[0] in services
    selected = {m for r in alert_rules() for m in re.findall(r'job="([^"]+)"', r["expr"])}
    assert selected <= jobs.keys()


def test_compose_opens_relay_to_its_own_network_only() -> None:
    """relay's config in compose admits loopback and the project's fixed subnet, nothing
    wider; the image's own config keeps /metrics inside the container."""
    compose = yaml.safe_load(COMPOSE.read_text())
    assert "./relay.yaml:/etc/relay/relay.yaml:ro" in compose["services"]["relay"]["volumes"]
    (subnet,) = [c["subnet"] for c in compose["networks"]["default"]["ipam"]["config"]]
    config = load_config(COMPOSE_RELAY)
    networks = {ipaddress.ip_network(n) for n in config.listen.allowed_networks or []}
    loopback = {n for n in networks if n.is_loopback}
    assert networks - loopback == {ipaddress.ip_network(subnet)}
    assert ipaddress.ip_network(subnet).prefixlen >= 24
    image = load_config(ROOT / "config" / "relay.docker.yaml")
    assert image.metrics.host == "127.0.0.1"
    image_data = image.model_dump(exclude={"listen", "metrics"})
    assert config.model_dump(exclude={"listen", "metrics"}) == image_data
    assert config.listen.port == image.listen.port
    assert config.metrics.port == image.metrics.port


def _compose_command() -> list[str] | None:
    """`docker compose` (v2 plugin) or `docker-compose` (v1); both validate offline."""
    if shutil.which("docker"):
        done = subprocess.run(["docker", "compose", "version"], capture_output=True,
                              timeout=30, check=False)
        if done.returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_docker_compose_validates_the_file() -> None:
    compose = _compose_command()
    if compose is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    done = subprocess.run([*compose, "--file", str(COMPOSE), "config", "--quiet"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_systemd_unit_matches_relay() -> None:
    unit: dict[str, list[str]] = defaultdict(list)
    for line in UNIT.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith(("#", ";")):
            unit[key.strip()].append(value.strip())
    # Exit 2 is relay's "bad config or usage": restarting cannot fix it.
    assert unit["RestartPreventExitStatus"] == [str(EXIT_USAGE)]
    assert unit["StateDirectory"] == ["relay"]
    assert unit["WorkingDirectory"] == ["/var/lib/relay"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["KillSignal"] == ["SIGTERM"]
    assert "--config /etc/relay/relay.yaml" in unit["ExecStart"][0]


# -- the real tools, where installed ------------------------------------------------

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian: apt-get install prometheus)",
)


def promtool(*args: str | Path) -> str:
    done = subprocess.run(["promtool", *map(str, args)], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_ci_installs_promtool() -> None:
    """So that CI runs the promtool tests below instead of skipping them (issue 19.6)."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"packages=\([^)]*\bprometheus\b", ci)
    assert "--no-install-recommends" in ci
    assert "promtool --version" in ci


def compose_prometheus_layout(root: Path) -> Path:
    """Copy the files compose mounts into the prometheus container to the same paths under
    ``root``; return the config file that compose's command line names.

    deploy/prometheus.yml loads its rules from beside it, where compose mounts
    config/prometheus-alerts.yml; checked anywhere else, its rule_files do not resolve.
    """
    service = yaml.safe_load(COMPOSE.read_text())["services"]["prometheus"]
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("."):  # a bind mount of a file in this repository
            inside = root / target.lstrip("/")
            inside.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(COMPOSE.parent / source, inside)
    (config_file,) = [arg.split("=", 1)[1] for arg in service["command"]
                      if arg.startswith("--config.file=")]
    return root / config_file.lstrip("/")


@needs_promtool
def test_promtool_accepts_rules_and_prometheus_config(tmp_path: Path) -> None:
    out = promtool("check", "rules", ALERTS)
    assert f"SUCCESS: {len(alert_rules())} rules found" in out
    config = compose_prometheus_layout(tmp_path)
    assert config == tmp_path / "etc" / "prometheus" / "prometheus.yml"
    out = promtool("check", "config", config)
    # The rules were found where compose puts them, and checked along with the config.
    assert f"SUCCESS: {len(alert_rules())} rules found" in out


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    rules = [{"record": f"dashboard:query_{i}", "expr": as_promql(e)}
             for i, e in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in promtool("check", "rules", path)


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    labels = {"job": "relay", "instance": "relay:9025", **labels}
    inner = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def _firing(alert: str, at: str, *expected: dict[str, str]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert,
            "exp_alerts": [{"exp_labels": labels} for labels in expected]}


@needs_promtool
def test_alerts_fire_on_the_situations_they_describe(tmp_path: Path) -> None:
    """promtool test rules: made-up series in, firing alerts out (annotations left aside)."""
    doc = yaml.safe_load(ALERTS.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")  # their text is checked by `promtool check rules`
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(doc))
    at = {"instance": "relay:9025"}
    gmail = {**at, "account": "gmail"}  # ses: the account that must not alert
    crit, warn = {"severity": "critical"}, {"severity": "warning"}
    series = [
        _series("up", "1 1 0x10"),
        {"series": 'probe_success{job="relay-readyz", instance="http://relay:9025/readyz"}',
         "values": "1 0x10"},
        # gmail: 10 more waiting every minute; ses: a steady backlog of 500.
        _series("relay_queue_messages", "0+10x60", account="gmail", state="queued"),
        _series("relay_queue_messages", "0x60", account="gmail", state="deferred"),
        _series("relay_queue_messages", "500x60", account="ses", state="queued"),
        _series("relay_queue_messages", "0x60", account="ses", state="deferred"),
        _series("relay_oldest_message_age_seconds", "0+60x120", account="gmail"),
        _series("relay_oldest_message_age_seconds", "30x120", account="ses"),
        # gmail: 3 deferrals per delivery; ses: 1 per 10 deliveries.
        _series("relay_messages_delivered_total", "0+1x60", account="gmail"),
        _series("relay_messages_deferred_total", "0+3x60", account="gmail"),
        _series("relay_messages_failed_total", "0x60", account="gmail"),
        _series("relay_messages_delivered_total", "0+10x60", account="ses"),
        _series("relay_messages_deferred_total", "0+1x60", account="ses"),
        _series("relay_messages_failed_total", "0x60", account="ses"),
        _series("relay_upstream_auth_failures_total", "0 0 1x10", account="gmail"),
        _series("relay_upstream_auth_failures_total", "0x12", account="ses"),
        _series("relay_messages_rejected_total", "0 0 1x10", reason="store_unavailable"),
        _series("relay_account_backoffs_total", "0 0 1x10", account="gmail", reason="quota"),
        _series("relay_account_backoffs_total", "0x12", account="ses", reason="quota"),
        _series("relay_internal_errors_total", "0 0 1x10", component="delivery"),
        # gmail backed off from 2m to 30m; ses paused from 40m to 50m (too short to alert);
        # "bulk" paused from 5m on.
        _series("relay_account_backoff", "0 0 1x28 0x30", account="gmail"),
        _series("relay_account_paused", "0x60", account="gmail"),
        _series("relay_account_backoff", "0x60", account="ses"),
        _series("relay_account_paused", "0x40 1x10 0x10", account="ses"),
        _series("relay_account_backoff", "0x60", account="bulk"),
        _series("relay_account_paused", "0x5 1x55", account="bulk"),
        _series("relay_messages_rejected_total", "0+5x30", reason="unknown_account"),
        _series("relay_messages_rejected_total", "0+50x30", reason="rate_limited"),
        # "hooks" gave an event up at 2m; "other" only failed (retried, not lost).
        _series("relay_webhook_deliveries_total", "0 0 1x10", webhook="hooks",
                result="gave_up"),
        _series("relay_webhook_deliveries_total", "0+1x12", webhook="other", result="failed"),
    ]
    tests = {
        "rule_files": ["alerts.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {"interval": "1m", "input_series": series, "alert_rule_test": [
                _firing("RelayDown", "1m"),
                _firing("RelayDown", "5m", {**crit, **at, "job": "relay"}),
                _firing("RelayNotReady", "4m", {**crit, "job": "relay-readyz",
                                                "instance": "http://relay:9025/readyz"}),
                _firing("RelayMetricsAbsent", "20m"),
                _firing("RelayBacklogGrowing", "20m"),  # over 100 since 11m: pending
                _firing("RelayBacklogGrowing", "30m", {**warn, **gmail}),
                _firing("RelayOldestMessageTooOld", "70m", {**warn, **gmail, "job": "relay"}),
                _firing("RelayDeliveryErrors", "20m", {**warn, **gmail}),
                _firing("RelayUpstreamAuthFailing", "3m", {**crit, **gmail}),
                _firing("RelayUpstreamAuthFailing", "30m"),
                _firing("RelayAccountRefused", "3m", {**warn, **gmail, "reason": "quota"}),
                _firing("RelayAccountRefused", "30m"),
                _firing("RelayAccountDown", "10m"),  # both still pending
                _firing("RelayAccountDown", "25m", {**warn, **gmail},
                        {**warn, **at, "account": "bulk"}),
                _firing("RelayAccountDown", "55m", {**warn, **at, "account": "bulk"}),
                _firing("RelayInternalErrors", "3m", {**warn, **at, "component": "delivery"}),
                _firing("RelayRejectingOnItsOwnFault", "3m",
                        {**crit, **at, "reason": "store_unavailable"}),
                _firing("RelayRejectingApplicationMail", "20m",
                        {**warn, **at, "reason": "unknown_account"}),
                _firing("RelayWebhookEventsLost", "3m", {**warn, **at, "webhook": "hooks"}),
            ]},
            {"interval": "1m", "input_series": [_series("relay_build_info", "1x20",
                                                        version="0.1.0")],
             "alert_rule_test": [
                 _firing("RelayMetricsAbsent", "5m"),
                 _firing("RelayMetricsAbsent", "15m", {**warn, "job": "relay"}),
             ]},
        ],
    }
    path = tmp_path / "alerts-test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    assert "SUCCESS" in promtool("test", "rules", path)


def test_every_alert_links_its_runbook_section() -> None:
    """On call, the alert's runbook_url opens the section that says what to do."""
    runbooks = (ROOT / "docs" / "runbooks.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", line[3:].strip().lower()).replace(" ", "-")
               for line in runbooks.splitlines() if line.startswith("## ")}
    for rule in alert_rules():
        url = rule["annotations"]["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page.endswith("/docs/runbooks.md"), rule["alert"]
        assert anchor == rule["alert"].lower() and anchor in anchors, rule["alert"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian: apt-get install systemd)")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """`systemd-analyze verify`, with ExecStart pointed at this machine's relay."""
    relay = shutil.which("relay")
    if relay is None:
        pytest.skip("the relay command is not on PATH (pip install -e .)")
    unit = tmp_path / "relay.service"
    unit.write_text(UNIT.read_text().replace("/opt/relay/bin/relay", relay))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 0 and str(unit.name) not in done.stderr, done.stderr


RUNBOOKS = "https://github.com/relay-smtp/relay/blob/main/docs/runbooks.md"


def test_one_documented_command_points_every_runbook_url_elsewhere(tmp_path: Path) -> None:
    """The runbook links share one base, and the sed line docs/monitoring.md gives
    rewrites every one of them (and nothing else), anchors kept."""
    if shutil.which("sed") is None:
        pytest.skip("needs sed")
    docs = (ROOT / "docs" / "monitoring.md").read_text()
    block = docs.split("<!-- test: runbook-base -->\n```sh\n", 1)[1].split("```", 1)[0]
    command = block.strip().replace("config/prometheus-alerts.yml", "alerts.yml")
    copy = tmp_path / "alerts.yml"
    copy.write_text(ALERTS.read_text())
    for rule in alert_rules():
        assert rule["annotations"]["runbook_url"].startswith(RUNBOOKS + "#"), rule["alert"]
    subprocess.run(["sh", "-c", command], cwd=tmp_path, check=True, timeout=10)
    rewritten = yaml.safe_load(copy.read_text())
    urls = {rule["alert"]: rule["annotations"]["runbook_url"]
            for group in rewritten["groups"] for rule in group["rules"]}
    assert urls == {rule["alert"]: "https://wiki.example.com/relay/runbooks.md#"
                    + rule["alert"].lower() for rule in alert_rules()}
    before, after = ALERTS.read_text(), copy.read_text()
    assert before.replace(RUNBOOKS, "https://wiki.example.com/relay/runbooks.md") == after
