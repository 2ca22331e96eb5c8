"""What a careless operator did to a running relay (full disk, bad config files, signals
at the wrong time), each with the answer relay now gives."""

from __future__ import annotations

import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client import CollectorRegistry

from relay.app import App
from relay.cli.commands import Reloads, _reload, main
from relay.config.loading import load_config, parse_config
from relay.config.report import effective_config
from relay.errors import ConfigError, StoreError
from tests.conftest import (
    StartRelay,
    message,
    metric,
    relay_config,
    send,
    upstream_account,
    wait_until,
)
from tests.relayproc import RelayProcess, write_config
from tests.upstream import FakeUpstream


async def _readyz(port: int) -> tuple[int, str]:
    url = f"http://127.0.0.1:{port}/readyz"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.text()


# -- 1. queue disk below queue.min_free ------------------------------------------------


def test_min_free_defaults_to_a_reserve_above_the_largest_message(tmp_path: Path) -> None:
    assert parse_config({}).queue_min_free == 64 * 1024**2
    big = parse_config({"listen": {"max_message_size": 50 * 1024**2}})
    assert big.queue_min_free == 100 * 1024**2
    assert parse_config({"queue": {"min_free": "10MB"}}).queue_min_free == 10_000_000
    # check-config shows the reserve in force, not "null"
    assert effective_config(parse_config({}))["queue"]["min_free"] == "64MiB"
    with pytest.raises(ConfigError, match=r"queue\.min_free: must be a size"):
        parse_config({"queue": {"min_free": "lots"}})


async def test_below_min_free_data_is_refused_but_queued_mail_is_delivered(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    account = {"up": upstream_account(upstream, tmp_path)}
    upstream.reply_to("MAIL", 451, "4.3.0 try later", times=1000)
    first = await start_relay(relay_config(tmp_path, account))
    code, _ = await send(first.smtp_port, message("waiting"))
    assert code == 250
    await first.shutdown()
    upstream.faults.replies.clear()
    # More free space asked for than any disk has: the file system is "below" it.
    app = await start_relay(relay_config(tmp_path, account, queue={"min_free": "1000000TB"}))
    code, text = await send(app.smtp_port, message("refused"))
    assert (code, text[:5]) == (452, "4.3.1"), text
    assert metric(app, "relay_messages_rejected_total", reason="low_disk") == 1
    status, body = await _readyz(app.http_port)
    assert status == 503 and "queue.min_free" in body, body
    # Claims and outcomes still write: the message queued before is delivered.
    await upstream.wait_for_messages(1)
    assert b"Subject: waiting" in upstream.messages[0].data
    await wait_until(lambda: metric(app, "relay_messages_delivered_total", account="up") == 1,
                     what="the outcome recorded")


async def test_an_outcome_not_written_by_shutdown_is_logged_per_message(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream,
                                                                           tmp_path)}))
    upstream.delay("DATA", 0.3)
    code, text = await send(app.smtp_port, message("sent once"))
    assert code == 250
    queue_id = text.split()[-1]
    await wait_until(lambda: bool(upstream.connections_opened), what="a delivery")
    thread = app.store._write_thread
    assert thread is not None
    thread.shutdown(wait=True)  # no write can run: the outcome cannot be recorded
    await upstream.wait_for_messages(1)
    await wait_until(lambda: "cannot record outcome" in caplog.text, what="a failed write")
    app.store._write_thread = ThreadPoolExecutor(1, thread_name_prefix="queue-writer")
    with caplog.at_level(logging.ERROR, logger="relay"):
        await app.shutdown(grace=0.3)
    lost = [r for r in caplog.records if getattr(r, "event", None) == "outcome_lost"]
    assert len(lost) == 1 and lost[0].levelno == logging.ERROR
    line = lost[0].getMessage()
    assert queue_id in line and "outcome=delivered" in line and "to@example.com" in line


# -- 2, 3. config files that cannot be read, or say nothing --------------------------


def _write(tmp_path: Path, name: str, raw: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(raw)
    return path


def test_a_config_that_is_not_utf8_is_one_line_without_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, "latin1.yaml",
                  b"accounts:\n  x: {host: h, password: s3cret-pw}\n# caf\xe9\n")
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"config error: {path}:3:6: not UTF-8: byte 0xe9 at offset 51" \
                  " (save the file as UTF-8)\n"


def test_a_config_nested_too_deeply_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, "deep.yaml", b"x: " + b"[" * 5000 + b"]" * 5000 + b"\n")
    assert main(["check-config", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"config error: {path}: invalid YAML: nested too deeply\n"


@pytest.mark.parametrize("raw", [b"", b"# only a comment\n\n"])
def test_an_empty_config_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], raw: bytes
) -> None:
    path = _write(tmp_path, "relay.yaml", raw)
    with pytest.raises(ConfigError, match="config file is empty"):
        load_config(path)  # what `relay serve` runs first
    assert main(["check-config", "--config", str(path)]) == 2
    assert "config file is empty" in capsys.readouterr().err
    assert main(["check-config", "--config", str(_write(tmp_path, "d.yaml", b"{}\n"))]) == 0


async def test_a_reload_refuses_undecodable_and_empty_files(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)})
    app = await start_relay(config)
    path = tmp_path / "relay.yaml"
    for raw, problem in ((b"x: {password: s3cret-pw}\n# caf\xe9\n", "not UTF-8"),
                         (b"", "config file is empty")):
        path.write_bytes(raw)
        caplog.clear()
        await _reload(app, str(path))
        assert problem in caplog.text and "still running with the previous one" in caplog.text
        assert "s3cret" not in caplog.text and "Traceback" not in caplog.text
        assert app.config is config  # nothing applied: the account is still there


# -- 4. zero delays and timeouts --------------------------------------------------------


@pytest.mark.parametrize("data, key", [
    ({"retry": {"initial_delay": 0}}, "retry.initial_delay"),
    ({"auth_backoff": {"initial": "0s"}}, "auth_backoff.initial"),
    ({"listen": {"timeout": 0}}, "listen.timeout"),
    ({"accounts": {"a": {"host": "h", "timeouts": {"connect": 0}}},
      "routing": {"default_account": "a"}}, "accounts.a.timeouts.connect"),
    ({"accounts": {"a": {"host": "h", "timeouts": {"command": "0ms"}}},
      "routing": {"default_account": "a"}}, "accounts.a.timeouts.command"),
    ({"accounts": {"a": {"host": "h", "timeouts": {"data": 0.0}}},
      "routing": {"default_account": "a"}}, "accounts.a.timeouts.data"),
    ({"accounts": {"a": {"host": "h", "retry": {"initial_delay": 0}}},
      "routing": {"default_account": "a"}}, "accounts.a.retry.initial_delay"),
    ({"accounts": {"a": {"host": "h", "auth_backoff": {"initial": 0}}},
      "routing": {"default_account": "a"}}, "accounts.a.auth_backoff.initial"),
])
def test_a_zero_delay_or_timeout_is_refused_naming_the_key(data: dict[str, object],
                                                           key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert caught.value.problems == [f"{key}: must be more than 0 (0 would mean no wait at all)"]


# -- 5. check-config refuses what serve would ---------------------------------------------


def test_check_config_refuses_tls_files_and_a_log_file_serve_would_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_pem = _write(tmp_path, "hostname", b"just a host name\n")
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({
        "listen": {"tls": {"cert": str(not_pem), "key": str(not_pem)}},
        "queue": {"path": str(tmp_path / "q.sqlite3")},
        "logging": {"file": str(tmp_path / "missing" / "relay.log")},
        "accounts": {"x": {"host": "127.0.0.1", "tls": "starttls",
                           "tls_ca_file": str(not_pem)}},
        "routing": {"default_account": "x"},
    }))
    assert main(["check-config", "--config", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[1].strip() for line in lines] == [
        "accounts.x.tls_ca_file", "listen.tls.cert", "logging.file"], lines
    assert lines[2] == f"config error: logging.file: no such directory {tmp_path / 'missing'}"
    assert not (tmp_path / "q.sqlite3").exists()  # checking opens no queue


# -- 6, 11. SIGHUP before the start has finished, and after SIGTERM -----------------------


async def test_sighup_while_starting_is_applied_once_started_and_ignored_when_stopping(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    relay = await RelayProcess.spawn(write_config(tmp_path, upstream), tmp_path,
                                     hangup_early=True)
    try:
        await relay.wait_started()
        await wait_until(lambda: "relay: reloaded" in relay.stderr, what="the held reload")
        relay.proc.send_signal(signal.SIGTERM)
        relay.proc.send_signal(signal.SIGHUP)
        code = await relay.exit_code(within=10)
    finally:
        await relay.kill()
    assert code == 0, relay.stderr
    assert relay.stderr.count("relay: reloaded") == 1, relay.stderr
    started = relay.stderr.index("relay: started ")
    assert relay.stderr.index("relay: reloaded") > started


async def test_sighup_after_sigterm_starts_no_reload(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream,
                                                                           tmp_path)}))
    reloads = Reloads(app, str(write_config(tmp_path, upstream)))
    reloads.on_hangup()
    assert len(reloads.tasks) == 1  # running: SIGHUP reloads
    await reloads.cancel()
    app.request_stop()  # SIGTERM
    reloads.on_hangup()
    assert not reloads.tasks and not reloads.held


# -- 8. start errors that are not "cannot listen" -----------------------------------------


async def test_a_queue_path_that_cannot_be_created_names_the_key(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    (tmp_path / "file").write_text("not a directory\n")
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                          queue={"path": str(tmp_path / "file" / "q" / "queue.sqlite3")})
    app = App(config, registry=CollectorRegistry())
    with pytest.raises(StoreError) as caught:
        await app.startup()
    assert str(caught.value) == (f"queue.path: cannot create {tmp_path / 'file' / 'q'}:"
                                 " Not a directory")


@pytest.mark.parametrize("metrics_host", ["127.0.0.1", "0.0.0.0"])
def test_metrics_on_the_listen_port_is_a_config_error(metrics_host: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"listen": {"port": 2600},
                      "metrics": {"host": metrics_host, "port": 2600}})
    assert caught.value.problems == [
        "metrics.port: 2600 is also listen.port; give the metrics endpoint a port of its own"]
    parse_config({"listen": {"port": 2600}, "metrics": {"enabled": False, "port": 2600}})


# -- 9. types, duplicate keys, keys as written, plain words --------------------------------


@pytest.mark.parametrize("text, problem", [
    ("listen: {port: true}\n", "listen.port: must be a whole number"),
    ("listen: {max_connections: 2.5}\n", "listen.max_connections: must be a whole number"),
    ("metrics: {enabled: 'yes'}\n", "metrics.enabled: must be true or false"),
    ("retry: {jitter: true}\n", "retry.jitter: must be a number"),
    ("queue: {path: 5}\n", "queue.path: must be a file path (a string)"),
    ("accounts: {a: {host: h, rate_limit: {per_second: yes}}}\n"
     "routing: {default_account: a}\n", "accounts.a.rate_limit.per_second: must be a whole number"),
])
def test_numbers_and_switches_take_no_other_type(tmp_path: Path, text: str,
                                                 problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, "relay.yaml", text.encode()))
    assert caught.value.problems == [problem]


def test_a_key_written_twice_is_refused_with_its_path_and_lines(tmp_path: Path) -> None:
    path = _write(tmp_path, "relay.yaml", b"accounts:\n  a:\n    host: h\n    tls: starttls\n"
                  b"    tls: none\nrouting: {default_account: a}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        f"{path}: accounts.a.tls: written twice (lines 4 and 5); remove one"]
    # A merge key (<<) is not a repeat: the keys written beside it override it.
    merged = _write(tmp_path, "merged.yaml", b"accounts:\n  a: &d {host: h, tls: none}\n"
                    b"  b: {<<: *d, host: other}\nrouting: {default_account: a}\n")
    assert load_config(merged).accounts["b"].host == "other"


def test_keys_are_read_as_written_not_as_yaml_booleans(tmp_path: Path) -> None:
    path = _write(tmp_path, "relay.yaml", b"accounts:\n  no: {transport: maildir}\n"
                  b"routing: {default_account: 'no'}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == ["accounts.no.path: required for a maildir account"]
    ok = _write(tmp_path, "ok.yaml", b"accounts:\n  no: {transport: maildir, path: box}\n"
                b"routing: {default_account: 'no'}\n")
    assert list(load_config(ok).accounts) == ["no"]


# -- 10. the queue file deleted under a running relay ------------------------------------


async def test_a_deleted_queue_file_fails_readyz_and_data_and_is_logged(
    tmp_path: Path, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)})
    app = App(config, registry=CollectorRegistry())
    app.queue_file_check_s = 0.05
    await app.startup()
    try:
        assert (await send(app.smtp_port, message("before")))[0] == 250
        for name in ("queue.sqlite3", "queue.sqlite3-wal", "queue.sqlite3-shm"):
            os.unlink(tmp_path / name)  # an operator "cleaning up"
        code, text = await send(app.smtp_port, message("after"))
        assert (code, text[:5]) == (451, "4.3.0"), text
        status, body = await _readyz(app.http_port)
        assert status == 503 and "was deleted while relay runs" in body, body
        await wait_until(lambda: "queue_file_lost" in caplog.text, what="the ERROR line")
        lost = [r for r in caplog.records if getattr(r, "event", None) == "queue_file_lost"]
        assert len(lost) == 1 and lost[0].levelno == logging.ERROR
    finally:
        await app.shutdown(grace=1.0)
