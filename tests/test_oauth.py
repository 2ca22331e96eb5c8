"""OAuth2 upstreams (issue 16 point 2): SASL XOAUTH2 with tokens from a token endpoint
(Google's refresh-token flow, Microsoft's client credentials) or a token_command.

Against the real FakeUpstream offering XOAUTH2 and checking each bearer token, and a real
token endpoint (tests/tokenserver.py) issuing short-lived tokens.
"""

from __future__ import annotations

import logging
import ssl
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from relay.config.loading import parse_config
from relay.config.report import config_warnings, effective_config, unresolved_secrets
from relay.delivery.oauth import (
    Token,
    TokenError,
    command_argv,
    command_token,
    parse_token_reply,
    renew_at,
    token_form,
)
from relay.delivery.smtp.tokens import TokenSource
from relay.errors import ConfigError, TemporaryFailure
from relay.queue.types import MessageState
from tests.conftest import StartRelay, message, metric, relay_config, send, wait_until
from tests.test_queue_cli import Relay, account_lines, write_config
from tests.tokenserver import TokenServer
from tests.upstream import FakeUpstream

# -- the pure parts -------------------------------------------------------------------


def test_token_reply_is_read_and_errors_never_carry_the_token() -> None:
    token = parse_token_reply(200, b'{"access_token": "ya29.abc", "expires_in": 3599,'
                                   b' "token_type": "Bearer"}')
    assert token == Token("ya29.abc", 3599.0)
    assert "ya29" not in repr(token)
    assert parse_token_reply(200, b'{"access_token": "t", "expires_in": "60"}').expires_in == 60
    assert parse_token_reply(200, b'{"access_token": "t"}').expires_in is None
    with pytest.raises(TokenError) as refused:
        parse_token_reply(400, b'{"error": "invalid_grant", "error_description":'
                               b' "Token has been expired or revoked.\\r\\nTrace: x"}')
    assert refused.value.credentials
    assert refused.value.reason == ("the token endpoint answered HTTP 400 invalid_grant (Token"
                                    " has been expired or revoked.\\r\\nTrace: x)")
    with pytest.raises(TokenError) as down:
        parse_token_reply(503, b"<html>busy</html>")
    assert not down.value.credentials and "HTTP 503 without a JSON object" in down.value.reason
    with pytest.raises(TokenError, match="no access_token"):
        parse_token_reply(200, b'{"token_type": "Bearer"}')


def test_a_token_is_renewed_before_it_expires() -> None:
    assert renew_at(100.0, 3600.0, 300.0) == 3400.0  # margin before expires_in
    assert renew_at(100.0, 2.0, 300.0) == 101.0  # a short-lived token: half its life
    assert renew_at(100.0, 0.0, 300.0) == 100.0


def test_token_forms() -> None:
    assert token_form("refresh_token", "id", client_secret="s", refresh_token="r") == {
        "grant_type": "refresh_token", "client_id": "id", "client_secret": "s",
        "refresh_token": "r"}
    assert token_form("client_credentials", "id", client_secret="s", scope="x/.default") == {
        "grant_type": "client_credentials", "client_id": "id", "client_secret": "s",
        "scope": "x/.default"}


def test_token_command_runs_without_a_shell_unless_it_needs_one() -> None:
    assert command_argv("oama access 'me@example.com'") == ["oama", "access", "me@example.com"]
    assert command_argv(["/bin/tok", "a b"]) == ["/bin/tok", "a b"]
    assert command_argv("gpg -d ~/.tok.gpg") == ["/bin/sh", "-c", "gpg -d ~/.tok.gpg"]
    assert command_argv("cat $F | jq -r .t")[:2] == ["/bin/sh", "-c"]
    assert command_token(b"tok123\n") == Token("tok123")
    for bad, why in [(b"\n", "printed no token"), (b"Bearer tok\n", "spaces"),
                     (b"\xff", "not UTF-8")]:
        with pytest.raises(TokenError, match=why) as caught:
            command_token(bad)
        assert "tok" not in caught.value.reason.replace("token", "")


# -- config ---------------------------------------------------------------------------


def _account(**auth: Any) -> dict[str, Any]:
    return {"host": "smtp.example.com", "username": "me@example.com",
            "auth": {"mechanism": "xoauth2", **auth}}


def _problems(account: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config({"accounts": {"mail": account}, "routing": {"default_account": "mail"}})
    return caught.value.problems


def test_config_errors_name_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_VAR", raising=False)
    assert _problems(_account()) == [
        "accounts.mail.auth.client_id: required (or give token_command)"]
    assert _problems(_account(token_command="tok", client_id="x")) == [
        "accounts.mail.auth.client_id: give either token_command or a token endpoint"
        " (client_id, token_url...), not both"]
    assert _problems(_account(client_id="x", refresh_token_env="R",
                              token_url="http://auth.example.com/token")) == [
        "accounts.mail.auth.token_url: 'http://auth.example.com/token' is not an https://"
        " URL (http:// only to a loopback address)"]
    assert _problems(_account(client_id="x", tenant="t", grant="client_credentials")) == [
        "accounts.mail.auth.client_secret_env: grant client_credentials needs"
        " client_secret_env or client_secret_file"]
    assert _problems(_account(client_id="x", token_url="https://a.example/t",
                              refresh_token_env="NO_SUCH_VAR")) == [
        "accounts.mail.auth.refresh_token_env: environment variable NO_SUCH_VAR is not set"]
    assert _problems({**_account(token_command="tok"), "password": "pw"}) == [
        "accounts.mail.password: not used with auth (XOAUTH2 logs in with a token, not a"
        " password)"]
    no_user = _account(token_command="tok")
    del no_user["username"]
    assert _problems(no_user) == [
        "accounts.mail.username: auth xoauth2 needs the mailbox's address as username"]
    assert _problems(_account(token_command="")) == [
        "accounts.mail.auth.token_command: must not be empty"]
    assert _problems(_account(token_command="pass show 'mail/token")) == [
        "accounts.mail.auth.token_command: cannot be parsed as a command line (No closing"
        " quotation: an unclosed quote?)"]


def test_microsoft_client_credentials_from_the_tenant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIENT_SECRET", "c-s3cret")
    config = parse_config({"accounts": {"m365": _account(
        grant="client_credentials", client_id="app", client_secret_env="CLIENT_SECRET",
        tenant="contoso.onmicrosoft.com")}, "routing": {"default_account": "m365"}})
    auth = config.accounts["m365"].auth
    assert auth is not None
    assert auth.endpoint == ("https://login.microsoftonline.com/contoso.onmicrosoft.com"
                             "/oauth2/v2.0/token")
    assert auth.effective_scope == "https://outlook.office365.com/.default"
    assert auth.client_secret == "c-s3cret"
    shown = str(effective_config(config)) + repr(config)
    assert "c-s3cret" not in shown and "CLIENT_SECRET" in shown


def test_check_config_warns_of_a_world_readable_refresh_token(tmp_path: Path) -> None:
    token = tmp_path / "refresh.token"
    token.write_text("r")
    token.chmod(0o644)
    config = parse_config({"accounts": {"mail": {**_account(
        client_id="x", token_url="https://a.example/t", refresh_token_file=str(token)),
        "host": "192.0.2.1", "tls": "none"}}, "routing": {"default_account": "mail"}})
    assert config_warnings(config) == [
        "accounts.mail.tls: none sends the access token unencrypted to 192.0.2.1",
        f"accounts.mail.auth.refresh_token_file: {token} is readable by every user (chmod 600"
        " or 640 it)"]


def test_check_config_names_unresolved_oauth_secrets(tmp_path: Path) -> None:
    config = parse_config({"accounts": {"mail": _account(
        client_id="x", token_url="https://a.example/t", refresh_token_env="UNSET_RT_VAR",
        client_secret_file=str(tmp_path / "missing"))},
        "routing": {"default_account": "mail"}}, secrets=False)
    assert unresolved_secrets(config) == [
        "accounts.mail.auth.client_secret_file: cannot read"
        f" {tmp_path / 'missing'} here",
        "accounts.mail.auth.refresh_token_env: environment variable UNSET_RT_VAR is not"
        " set here"]


# -- against the test upstream and token endpoint -------------------------------------


@pytest.fixture
async def xoauth2_upstream() -> Any:
    async with FakeUpstream(xoauth2=True, username="me@example.com") as up:
        yield up


def _endpoint_account(up: FakeUpstream, tokens: TokenServer, tmp_path: Path,
                      **extra: Any) -> dict[str, Any]:
    """An account logging in to ``up`` with tokens from ``tokens`` (refresh-token flow)."""
    secret, refresh = tmp_path / "client.secret", tmp_path / "refresh.token"
    secret.write_text(tokens.client_secret)
    refresh.write_text(tokens.refresh_token + "\n")
    for path in (secret, refresh):
        path.chmod(0o600)
    return {"host": up.host, "port": up.port, "tls": "none", "username": up.username,
            "auth": {"mechanism": "xoauth2", "client_id": tokens.client_id,
                     "client_secret_file": str(secret), "refresh_token_file": str(refresh),
                     "token_url": tokens.url},
            **extra}


def _relay_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("relay"))


def _no_secrets(text: str, tokens: TokenServer) -> None:
    for secret in (tokens.client_secret, tokens.refresh_token, *tokens.issued):
        assert secret not in text


async def test_refresh_token_flow_logs_in_with_xoauth2(
    tmp_path: Path, xoauth2_upstream: FakeUpstream, start_relay: StartRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    up = xoauth2_upstream
    async with TokenServer(up) as tokens:
        app = await start_relay(relay_config(tmp_path, {
            "google": _endpoint_account(up, tokens, tmp_path)}))
        assert (await send(app.smtp_port, message("one")))[0] == 250
        await up.wait_for_messages(1)
    assert up.xoauth2_logins == [("me@example.com", "token-1")]
    assert tokens.requests == [{"grant_type": "refresh_token", "client_id": tokens.client_id,
                                "client_secret": tokens.client_secret,
                                "refresh_token": tokens.refresh_token}]
    _no_secrets(_relay_text(caplog), tokens)


async def test_a_token_is_refreshed_before_it_expires(
    tmp_path: Path, xoauth2_upstream: FakeUpstream, start_relay: StartRelay,
) -> None:
    """Tokens last 2 s, so relay renews one after 1 s: the second login, 1.1 s later,
    has a new token although the old one would still have worked."""
    up = xoauth2_upstream
    async with TokenServer(up, lifetime=2.0) as tokens:
        app = await start_relay(relay_config(tmp_path, {"google": _endpoint_account(
            up, tokens, tmp_path, pool={"max_messages_per_connection": 1})}))
        assert (await send(app.smtp_port, message("one")))[0] == 250
        await up.wait_for_messages(1)
        await wait_until(lambda: up.connections_open == 0, what="the first connection closed")
        first_login = up.times_of("AUTH")[0]
        await wait_until(lambda: time.monotonic() > first_login + 1.1,
                         what="half the token's life")
        assert (await send(app.smtp_port, message("two")))[0] == 250
        await up.wait_for_messages(2)
    assert tokens.issued == ["token-1", "token-2"]
    assert [t for _, t in up.xoauth2_logins] == ["token-1", "token-2"]
    assert up.auth_failures == 0


async def test_a_refused_token_is_refreshed_and_tried_once_more(
    tmp_path: Path, xoauth2_upstream: FakeUpstream, start_relay: StartRelay,
) -> None:
    up = xoauth2_upstream
    async with TokenServer(up) as tokens:
        app = await start_relay(relay_config(tmp_path, {"google": _endpoint_account(
            up, tokens, tmp_path, pool={"max_messages_per_connection": 1})}))
        assert (await send(app.smtp_port, message("one")))[0] == 250
        await up.wait_for_messages(1)
        up.revoke_tokens()  # token-1 is still fresh for relay, but no longer good
        assert (await send(app.smtp_port, message("two")))[0] == 250
        await up.wait_for_messages(2)
    assert [t for _, t in up.xoauth2_logins] == ["token-1", "token-1", "token-2"]
    assert up.auth_failures == 1
    assert metric(app, "relay_account_backoffs_total", account="google", reason="auth") == 0


async def test_a_token_refused_twice_backs_the_account_off_like_a_535(
    tmp_path: Path, xoauth2_upstream: FakeUpstream, start_relay: StartRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    up = xoauth2_upstream
    up.fail_auth()
    async with TokenServer(up) as tokens:
        app = await start_relay(relay_config(tmp_path, {
            "google": _endpoint_account(up, tokens, tmp_path)}))
        assert (await send(app.smtp_port, message("one")))[0] == 250
        await wait_until(lambda: metric(app, "relay_account_backoffs_total", account="google",
                                        reason="auth") == 1, what="an auth backoff")
        assert up.auth_failures == 2 and tokens.issued == ["token-1", "token-2"]
        assert metric(app, "relay_upstream_auth_failures_total", account="google") >= 1
        assert up.messages == []
        up.fail_auth(False)
        await up.wait_for_messages(1)  # once the (fast) auth backoff is over
        _no_secrets(_relay_text(caplog), tokens)
    assert "535" in _relay_text(caplog)


async def test_a_refused_refresh_token_backs_off_and_names_the_account(
    tmp_path: Path, xoauth2_upstream: FakeUpstream, start_relay: StartRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    up = xoauth2_upstream
    async with TokenServer(up) as tokens:
        tokens.refuse_next = 1
        app = await start_relay(relay_config(tmp_path, {
            "google": _endpoint_account(up, tokens, tmp_path)}))
        assert (await send(app.smtp_port, message("one")))[0] == 250
        await wait_until(lambda: metric(app, "relay_account_backoffs_total", account="google",
                                        reason="auth") == 1, what="an auth backoff")
        await up.wait_for_messages(1)  # the next token request works
        assert up.auth_failures == 0 and up.xoauth2_logins[0][1] == "token-1"
        # A refused login for the RelayUpstreamAuthFailing alert, though no 535 came.
        assert metric(app, "relay_upstream_auth_failures_total", account="google") == 1
        text = _relay_text(caplog)
    assert ("XOAUTH2 token for account google: the token endpoint answered HTTP 400"
            " invalid_grant (Token has been expired or revoked.)") in text
    _no_secrets(text, tokens)


async def test_the_token_endpoint_certificate_is_verified(
    tmp_path: Path, xoauth2_upstream: FakeUpstream, self_signed: tuple[Path, Path],
) -> None:
    """An https endpoint whose certificate no trusted CA signed gets no secrets."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*self_signed)
    async with TokenServer(xoauth2_upstream, ssl_context=context) as tokens:
        config = parse_config({"accounts": {"google": _endpoint_account(
            xoauth2_upstream, tokens, tmp_path)}, "routing": {"default_account": "google"}})
        auth = config.accounts["google"].auth
        assert auth is not None
        with pytest.raises(TemporaryFailure) as caught:
            await TokenSource("google", auth).token()
    assert caught.value.reason == ("XOAUTH2 token for account google: cannot reach the token"
                                   " endpoint: TLS failure (certificate not trusted?)")
    assert tokens.requests == []


async def test_client_credentials_post_the_scope(
    tmp_path: Path, xoauth2_upstream: FakeUpstream, start_relay: StartRelay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    up = xoauth2_upstream
    async with TokenServer(up) as tokens:
        monkeypatch.setenv("TEST_CLIENT_SECRET", tokens.client_secret)
        app = await start_relay(relay_config(tmp_path, {"m365": {
            "host": up.host, "port": up.port, "tls": "none", "username": up.username,
            "auth": {"mechanism": "xoauth2", "grant": "client_credentials",
                     "client_id": tokens.client_id, "client_secret_env": "TEST_CLIENT_SECRET",
                     "token_url": tokens.url}}}))
        assert (await send(app.smtp_port, message("one")))[0] == 250
        await up.wait_for_messages(1)
    assert tokens.requests[0]["scope"] == "https://outlook.office365.com/.default"
    assert "refresh_token" not in tokens.requests[0]


# -- token_command --------------------------------------------------------------------


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


async def test_token_command_logs_in_and_is_run_again_for_a_refused_token(
    tmp_path: Path, xoauth2_upstream: FakeUpstream, start_relay: StartRelay,
) -> None:
    up = xoauth2_upstream
    runs = tmp_path / "runs"
    # Each run prints a new token: cmd-1, cmd-2... and the upstream accepts those.
    script = _script(tmp_path, "token", f'echo x >> {runs}\necho "cmd-$(wc -l < {runs})"\n')
    for n in (1, 2):
        up.accept_token(f"cmd-{n}")
    app = await start_relay(relay_config(tmp_path, {"mail": {
        "host": up.host, "port": up.port, "tls": "none", "username": up.username,
        "pool": {"max_messages_per_connection": 1},
        "auth": {"mechanism": "xoauth2", "token_command": str(script)}}}))
    assert (await send(app.smtp_port, message("one")))[0] == 250
    await up.wait_for_messages(1)
    del up.tokens["cmd-1"]
    assert (await send(app.smtp_port, message("two")))[0] == 250
    await up.wait_for_messages(2)
    assert [t for _, t in up.xoauth2_logins] == ["cmd-1", "cmd-1", "cmd-2"]
    assert runs.read_text().count("x") == 2  # cached between, run again once refused
    assert metric(app, "relay_account_backoffs_total", account="mail", reason="auth") == 0


def _command_source(command: str | list[str], **auth: Any) -> TokenSource:
    config = parse_config({"accounts": {"mail": _account(token_command=command, **auth)},
                           "routing": {"default_account": "mail"}})
    oauth = config.accounts["mail"].auth
    assert oauth is not None
    return TokenSource("mail", oauth)


@pytest.mark.parametrize(("body", "extra", "reason"), [
    ("echo SECRET-OUTPUT\necho SECRET-ERR >&2\nexit 3\n", {},
     "token_command exited with status 3 (its output is not shown: it may hold secrets;"
     " run it by hand)"),
    ("exec sleep 5\n", {"token_command_timeout": "200ms"},
     "token_command timed out after 0.2s (killed)"),
    ("echo\n", {}, "token_command printed no token"),
])
async def test_a_failing_token_command_is_a_clear_error_without_its_output(
    tmp_path: Path, body: str, extra: dict[str, Any], reason: str,
) -> None:
    source = _command_source(str(_script(tmp_path, "tok", body)), **extra)
    with pytest.raises(TemporaryFailure) as caught:
        await source.token()
    assert caught.value.reason == f"XOAUTH2 token for account mail: {reason}"
    assert caught.value.account_wide and not caught.value.offered
    assert "SECRET" not in caught.value.reason


async def test_a_token_command_that_leaves_a_child_holding_stdout_gives_its_token(
    tmp_path: Path, xoauth2_upstream: FakeUpstream, capsys: pytest.CaptureFixture[str],
) -> None:
    """It printed a line and exited: that is its answer, whatever a background child it
    left does with stdout; `accounts test` says ok, without a traceback (a2 #8)."""
    script = _script(tmp_path, "tok", "echo cmd-bg\nsleep 2 &\n")
    source = _command_source(str(script), token_command_timeout="1s")
    assert await source.token() == "cmd-bg"
    up = xoauth2_upstream
    up.accept_token("cmd-bg")
    relay = Relay(write_config(tmp_path, {"mail": {
        "host": up.host, "port": up.port, "tls": "none", "username": up.username,
        "auth": {"mechanism": "xoauth2", "token_command": str(script),
                 "token_command_timeout": "1s"}}}), capsys)
    tested = await relay("accounts", "test", "mail")
    assert tested.code == 0, tested.out + tested.err
    assert account_lines(tested.out)["auth"] == "ok"
    assert "Traceback" not in tested.err and "Event loop is closed" not in tested.err


async def test_a_missing_token_command_says_so(tmp_path: Path) -> None:
    source = _command_source([str(tmp_path / "nowhere"), "--flag"])
    with pytest.raises(TemporaryFailure, match="token_command cannot run nowhere: No such"):
        await source.token()


async def test_a_shell_command_runs_through_sh(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKEN_FILE", str(tmp_path / "t"))
    (tmp_path / "t").write_text("from-file\n")
    assert await _command_source("cat $TOKEN_FILE | tr -d ' '").token() == "from-file"


# -- relay accounts test --------------------------------------------------------------


async def test_accounts_test_logs_in_with_xoauth2(
    tmp_path: Path, xoauth2_upstream: FakeUpstream, capsys: pytest.CaptureFixture[str],
) -> None:
    up = xoauth2_upstream
    async with TokenServer(up) as tokens:
        relay = Relay(write_config(tmp_path, {"google": _endpoint_account(up, tokens, tmp_path)}),
                      capsys)
        ok = await relay("accounts", "test", "google")
        assert ok.code == 0, ok.out + ok.err
        assert account_lines(ok.out)["auth"] == "ok"
        tokens.refuse_next = 1
        refused = await relay("accounts", "test", "google")
        check = await relay("check-config")
    assert refused.code == 1
    assert account_lines(refused.out)["auth"] == (
        "FAILED: XOAUTH2 token for account google: the token endpoint answered HTTP 400"
        " invalid_grant (Token has been expired or revoked.)")
    assert check.code == 0
    for result in (ok, refused, check):
        _no_secrets(result.out + result.err, tokens)


async def test_messages_stay_queued_while_no_token_can_be_had(
    tmp_path: Path, xoauth2_upstream: FakeUpstream, start_relay: StartRelay,
) -> None:
    """Nothing lost: with the endpoint refusing, the message waits (deferred or queued),
    and the attempt is not counted against its max_age budget of tries."""
    up = xoauth2_upstream
    async with TokenServer(up) as tokens:
        tokens.refuse_next = 1000
        app = await start_relay(relay_config(tmp_path, {
            "google": _endpoint_account(up, tokens, tmp_path)}))
        assert (await send(app.smtp_port, message("one")))[0] == 250
        await wait_until(lambda: len(tokens.requests) >= 2, what="two token requests")
        rows = await app.store.list_messages()
        assert [r.state for r in rows] in ([MessageState.DEFERRED], [MessageState.QUEUED],
                                           [MessageState.SENDING])
        assert up.messages == [] and up.xoauth2_logins == []
        assert up.connections_opened == 0  # no token, no connection


async def test_a_new_refresh_token_is_taken_on_reload(
    tmp_path: Path, xoauth2_upstream: FakeUpstream, start_relay: StartRelay,
) -> None:
    """The runbook's fix for a revoked refresh token: store the new one, SIGHUP."""
    up = xoauth2_upstream
    async with TokenServer(up) as tokens:
        account = _endpoint_account(up, tokens, tmp_path)
        app = await start_relay(relay_config(tmp_path, {"google": account}))
        assert (await send(app.smtp_port, message("one")))[0] == 250
        await up.wait_for_messages(1)
        tokens.refresh_token = "the-new-refresh-token"  # the old one is refused from now on
        (tmp_path / "refresh.token").write_text(tokens.refresh_token)
        assert await app.reload(relay_config(tmp_path, {"google": account})) == []
        up.revoke_tokens()  # the next login needs a new access token
        assert (await send(app.smtp_port, message("two")))[0] == 250
        await up.wait_for_messages(2)
    assert [r["refresh_token"] for r in tokens.requests] == [
        "refresh-s3cret", "the-new-refresh-token"]
    assert metric(app, "relay_upstream_auth_failures_total", account="google") == 0
