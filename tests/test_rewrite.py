"""Sender rewriting for strict upstreams (issue 15.6): per account, opt-in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from relay.config.loading import parse_config
from relay.delivery.rewrite import Rewrite
from relay.errors import ConfigError
from relay.smtp.headers import get_header, parse_headers
from tests.conftest import StartRelay, relay_config, send, upstream_account
from tests.upstream import FakeUpstream

BODY = (b"DKIM-Signature: v=1; d=brand.example; h=from:subject; b=abc\r\n"
        b'From: "Brand Shop" <news@brand.example>\r\n'
        b"Subject: hello\r\n\r\nbody stays\r\n")


def test_the_envelope_sender_alone() -> None:
    sender, body = Rewrite("noreply@example.com").apply("app@brand.example", BODY)
    assert (sender, body) == ("noreply@example.com", BODY)


def test_from_replaced_keeping_its_name_and_the_original_as_reply_to() -> None:
    rewrite = Rewrite("noreply@example.com", replace_header_from=True, reply_to_original=True)
    sender, body = rewrite.apply("app@brand.example", BODY)
    fields = parse_headers(body)
    assert sender == "noreply@example.com"
    assert get_header(fields, "From") == '"Brand Shop" <noreply@example.com>'
    assert get_header(fields, "Reply-To") == '"Brand Shop" <news@brand.example>'
    assert [k for k, _ in fields].count("From") == 1
    assert body.endswith(b"Subject: hello\r\n\r\nbody stays\r\n")
    assert b"DKIM-Signature: v=1; d=brand.example; h=from:subject; b=abc\r\n" in body


def test_an_existing_reply_to_and_a_bare_from() -> None:
    rewrite = Rewrite("noreply@example.com", replace_header_from=True, reply_to_original=True)
    original = b"From: app@brand.example\r\nReply-To: support@brand.example\r\n\r\nx\r\n"
    _, body = rewrite.apply("app@brand.example", original)
    fields = parse_headers(body)
    assert get_header(fields, "From") == "noreply@example.com"
    assert [v for k, v in fields if k == "Reply-To"] == ["support@brand.example"]


def test_a_bounce_keeps_the_null_sender() -> None:
    sender, _ = Rewrite("noreply@example.com").apply("", BODY)
    assert sender == ""


@pytest.mark.parametrize(("rewrite", "problem"), [
    ({"header_from": "replace"}, "accounts.a.rewrite.header_from: replace needs envelope_from"),
    ({"envelope_from": "n@example.com", "reply_to": "original"},
     "accounts.a.rewrite.reply_to: original needs header_from: replace"),
    ({"envelope_from": "not an address"}, "accounts.a.rewrite.envelope_from: "),
    ({"header_from": "drop"}, "accounts.a.rewrite.header_from: "),
])
def test_bad_rewrite_blocks_name_the_key(rewrite: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"accounts": {"a": {"host": "smtp.example.com", "rewrite": rewrite}},
                      "routing": {"default_account": "a"}})
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


async def test_only_the_account_that_asks_rewrites(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    async with FakeUpstream() as strict:
        config = relay_config(tmp_path, {
            "plain": upstream_account(upstream, tmp_path),
            "outlook": upstream_account(strict, tmp_path, rewrite={
                "envelope_from": "relay@example.com", "header_from": "replace",
                "reply_to": "original"}),
        })
        app = await start_relay(config)
        assert (await send(app.smtp_port, BODY, sender="app@brand.example"))[0] == 250
        with_header = BODY.replace(b"Subject:", b"X-Account: outlook\r\nSubject:")
        assert (await send(app.smtp_port, with_header, sender="app@brand.example"))[0] == 250
        await upstream.wait_for_messages(1)
        await strict.wait_for_messages(1)
        assert upstream.messages[0].mail_from == "app@brand.example"
        assert upstream.messages[0].data == BODY  # never rewritten by default
        got = strict.messages[0]
        assert got.mail_from == "relay@example.com"
        fields = parse_headers(got.data)
        assert get_header(fields, "From") == '"Brand Shop" <relay@example.com>'
        assert get_header(fields, "Reply-To") == '"Brand Shop" <news@brand.example>'
        # The queue keeps what the application sent (a bounce quotes that).
        [queued] = [m for m in await app.store.list_messages() if m.account == "outlook"]
        assert queued.sender == "app@brand.example"
