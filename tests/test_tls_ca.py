"""tls_ca_file: an upstream whose certificate a private CA signed is verified, not
trusted blindly (issue 11 point 16). The CA is made in the test with openssl."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.errors import ConfigError
from tests.conftest import (
    PrivateCA,
    StartRelay,
    message,
    metric,
    relay_config,
    send,
    upstream_account,
    wait_until,
)
from tests.upstream import FakeUpstream


async def test_an_account_trusts_its_private_ca(
    tmp_path: Path, private_ca: PrivateCA, start_relay: StartRelay
) -> None:
    async with FakeUpstream(tls_context=private_ca.server_context) as up:
        account = upstream_account(up, tmp_path, tls="starttls",
                                   tls_ca_file=str(private_ca.ca_cert))
        app = await start_relay(relay_config(tmp_path, {"up": account}))
        assert (await send(app.smtp_port, message("over verified TLS")))[0] == 250
        await up.wait_for_messages(1)
        assert up.auth_successes == 1


async def test_without_the_ca_the_certificate_is_refused(
    tmp_path: Path, private_ca: PrivateCA, start_relay: StartRelay
) -> None:
    """The control: the same upstream without tls_ca_file fails verification."""
    async with FakeUpstream(tls_context=private_ca.server_context) as up:
        account = upstream_account(up, tmp_path, tls="starttls")
        app = await start_relay(relay_config(tmp_path, {"up": account}))
        assert (await send(app.smtp_port, message("unverified")))[0] == 250
        await wait_until(lambda: metric(app, "relay_messages_deferred_total", account="up")
                         >= 1, what="a deferral")
        assert up.messages == [] and up.auth_successes == 0
        (deferred,) = await app.store.list_messages()
        assert "CERTIFICATE_VERIFY_FAILED" in deferred.last_error


def test_tls_ca_file_is_checked_with_the_key_named(tmp_path: Path) -> None:
    up = {"host": "mail.example.com", "tls": "starttls"}
    with pytest.raises(ConfigError, match=r"accounts\.up\.tls_ca_file: no such file"):
        relay_config(tmp_path, {"up": {**up, "tls_ca_file": str(tmp_path / "none.pem")}})
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    with pytest.raises(ConfigError, match=r"accounts\.up\.tls_ca_file: .*tls_verify: false"):
        relay_config(tmp_path, {"up": {**up, "tls_ca_file": str(ca), "tls_verify": False}})
