"""Provider quotas (issue 15.3): per_rolling_day, presets, `relay accounts quota`, and
relay_account_quota_remaining."""

from __future__ import annotations

import asyncio
import calendar
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.cli.commands import main
from relay.config.loading import parse_config
from relay.errors import ConfigError
from tests.conftest import (
    StartRelay,
    message,
    metric,
    relay_config,
    send,
    upstream_account,
)
from tests.upstream import FakeUpstream


def _account(**keys: Any) -> dict[str, Any]:
    return {"accounts": {"a": {"username": "u", "password": "p", **keys}},
            "routing": {"default_account": "a"}}


def test_a_preset_fills_host_port_tls_and_published_limits() -> None:
    acc = parse_config(_account(preset="m365")).accounts["a"]
    assert (acc.host, acc.effective_port, acc.tls) == ("smtp.office365.com", 587, "starttls")
    assert acc.rate_limit.named_windows() == [("per_minute", 60.0, 30),
                                              ("per_rolling_day", 86400.0, 10000)]
    # A lower limit than the published one is the operator's to set; the same port is fine.
    acc = parse_config(_account(preset="gmail", port="587",
                                rate_limit={"per_rolling_day": 400})).accounts["a"]
    assert acc.rate_limit.per_rolling_day == 400
    acc = parse_config(_account(preset="ses-sandbox",
                                host="email-smtp.eu-west-1.amazonaws.com")).accounts["a"]
    assert acc.rate_limit.windows() == [(1.0, 1), (86400.0, 200)]


@pytest.mark.parametrize(("keys", "problem"), [
    ({"preset": "gmail", "host": "smtp.example.com"},
     "accounts.a.host: preset gmail uses smtp.gmail.com; remove host or the preset"),
    ({"preset": "google-workspace", "tls": "implicit"},
     "accounts.a.tls: preset google-workspace uses starttls"),
    ({"preset": "sendgrid-free", "rate_limit": {"per_rolling_day": 1000}},
     "accounts.a.rate_limit.per_rolling_day: 1000 is above sendgrid-free's published limit"),
    ({"preset": "ses-sandbox"}, "accounts.a.host: required for an smtp account (ses-sandbox"),
    ({"preset": "hotmail"}, "accounts.a.preset: "),
    ({"preset": "gmail", "transport": "maildir", "path": "/tmp/box"},
     "accounts.a.preset: a provider preset is for smtp accounts"),
    ({"rate_limit": {"reserve_for_high": "110%"}}, "accounts.a.rate_limit.reserve_for_high: "),
    ({"rate_limit": {"reserve_for_high": "lots%"}}, "accounts.a.rate_limit.reserve_for_high: "),
])
def test_a_conflicting_or_bad_key_is_named(keys: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_account(**keys))
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_reserve_for_high_takes_a_percentage_or_a_fraction() -> None:
    for value in ("10%", 0.1, "0.1"):
        limits = {"per_minute": 10, "reserve_for_high": value}
        acc = parse_config(_account(host="smtp.example.com",
                                    rate_limit=limits)).accounts["a"]
        assert acc.rate_limit.reserve_for_high == pytest.approx(0.1)


async def test_per_rolling_day_holds_and_quota_shows_what_is_left(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    capsys: pytest.CaptureFixture[str],
) -> None:
    account = upstream_account(upstream, tmp_path, rate_limit={"per_rolling_day": 2})
    config = relay_config(tmp_path, {"up": account})
    app = await start_relay(config)
    for i in range(3):
        assert (await send(app.smtp_port, message(f"m{i}")))[0] == 250
    await upstream.wait_for_messages(2)
    await asyncio.sleep(0.3)
    assert len(upstream.messages) == 2  # the third waits for the rolling day
    states = sorted(str(m.state) for m in await app.store.list_messages())
    assert states == ["delivered", "delivered", "queued"]
    await app.refresh_gauges()
    assert app.registry.get_sample_value("relay_account_quota_remaining",
                                         {"account": "up", "window": "per_rolling_day"}) == 0
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({
        "accounts": {"up": account}, "queue": {"path": str(config.queue.path)},
        "routing": {"default_account": "up"}}))
    code = await asyncio.to_thread(main, ["accounts", "quota", "-c", str(path), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    [window] = doc["accounts"]["up"]["windows"]
    assert (window["window"], window["remaining"], window["used"]) == ("per_rolling_day", 0, 2)
    # The next slot: when the first send leaves the rolling 24 hours.
    slot = calendar.timegm(time.strptime(window["next_slot_at"], "%Y-%m-%dT%H:%M:%SZ"))
    assert time.time() + 86400 - 60 < slot <= time.time() + 86400
    code = await asyncio.to_thread(main, ["accounts", "quota", "-c", str(path)])
    text = capsys.readouterr().out
    assert "per_rolling_day       0 left of 2" in text


async def test_quota_gauge_counts_down_from_the_limit(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    account = upstream_account(upstream, tmp_path,
                               rate_limit={"per_minute": 10, "per_rolling_day": 50})
    app = await start_relay(relay_config(tmp_path, {"up": account}))
    await app.refresh_gauges()
    assert metric(app, "relay_account_quota_remaining", account="up", window="per_minute") == 10
    assert (await send(app.smtp_port, message("one")))[0] == 250
    await upstream.wait_for_messages(1)

    await app.scheduler.run_until_idle()  # the outcome (and its send) is recorded
    await app.refresh_gauges()
    assert metric(app, "relay_account_quota_remaining", account="up",
                  window="per_rolling_day") == 49
    assert metric(app, "relay_account_quota_remaining", account="up", window="per_minute") == 9
