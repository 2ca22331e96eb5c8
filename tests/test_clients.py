"""Real SMTP clients, set up as docs/clients.md says, against a running relay.

Each test sends one message with `X-Account: second` and a priority header through a
relay whose default account is `main`; the upstream of `second` must receive it without
the X-Account header, `main`'s must receive nothing, and the queue record must carry the
priority. Clients that are not installed here are skipped, saying what is missing.
"""

from __future__ import annotations

import asyncio
import shutil
import smtplib
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path

import pytest

from relay.app import App
from relay.message import Priority
from tests.conftest import StartRelay, relay_config, upstream_account
from tests.upstream import FakeUpstream, Received

SENDER, RECIPIENT = "app@example.com", "user@example.com"


@dataclass
class Routed:
    app: App
    main: FakeUpstream  # the default account's upstream
    second: FakeUpstream  # the upstream of the account named in X-Account

    @property
    def port(self) -> int:
        return self.app.smtp_port


@pytest.fixture
async def second_upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(username="second", password="second-secret") as up:
        yield up


@pytest.fixture
async def routed(upstream: FakeUpstream, second_upstream: FakeUpstream,
                 start_relay: StartRelay, tmp_path: Path) -> Routed:
    config = relay_config(tmp_path, {
        "main": upstream_account(upstream, tmp_path),
        "second": upstream_account(second_upstream, tmp_path),
    })
    return Routed(await start_relay(config), upstream, second_upstream)


async def delivered_to_second(routed: Routed, subject: str, priority: Priority) -> Received:
    """The message arrived at `second`'s upstream only, without X-Account, with its priority."""
    await routed.second.wait_for_messages(1)
    got = routed.second.messages[0]
    assert routed.main.messages == []
    assert got.mail_from == SENDER and got.rcpt_tos == (RECIPIENT,)
    headers = message_from_bytes(got.data, policy=default_policy)
    assert headers["Subject"] == subject
    assert headers["X-Account"] is None
    assert b"\nx-account:" not in got.data.lower()
    (record,) = await routed.app.store.list_messages()
    assert record.account == "second"
    assert record.priority is priority
    return got


async def run(*argv: str, cwd: Path | None = None, timeout: float = 30) -> tuple[int, str]:
    """A client in a subprocess, without blocking the loop the relay runs in."""
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


# -- Python: smtplib ----------------------------------------------------------------


def smtplib_send(port: int, *, account: str, subject: str) -> None:
    """As in docs/clients.md: smtplib's send_message with the two headers."""
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = RECIPIENT
    msg["Subject"] = subject
    msg["X-Account"] = account
    msg["X-Priority"] = "1"
    msg.set_content("Your password reset code is 123456.\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.send_message(msg)


async def test_python_smtplib(routed: Routed) -> None:
    await asyncio.to_thread(smtplib_send, routed.port, account="second", subject="smtplib")
    got = await delivered_to_second(routed, "smtplib", Priority.HIGH)
    assert b"Your password reset code is 123456." in got.data


async def test_python_smtplib_sees_an_unknown_account_at_once(routed: Routed) -> None:
    with pytest.raises(smtplib.SMTPDataError) as refused:
        await asyncio.to_thread(smtplib_send, routed.port, account="secnod", subject="typo")
    assert refused.value.smtp_code == 550
    assert b"unknown account 'secnod'" in refused.value.smtp_error
    assert await routed.app.store.list_messages() == []


# -- Django -------------------------------------------------------------------------


def django_send(port: int) -> int:
    """Django's SMTP backend as docs/clients.md configures it (the port is the test's)."""
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend",
            EMAIL_HOST="127.0.0.1",
            EMAIL_PORT=2525,
            EMAIL_USE_TLS=False,
            EMAIL_TIMEOUT=10,
            DEFAULT_FROM_EMAIL=SENDER,
        )
    from django.core.mail import EmailMessage as DjangoEmailMessage
    from django.core.mail import get_connection

    message = DjangoEmailMessage(
        subject="django",
        body="Your weekly digest.\n",
        to=[RECIPIENT],
        headers={"X-Account": "second", "X-Priority": "5"},
        connection=get_connection(port=port),
    )
    return int(message.send())


async def test_django_smtp_backend(routed: Routed) -> None:
    pytest.importorskip("django", reason="Django is not installed (pip install -e '.[test]')")
    assert await asyncio.to_thread(django_send, routed.port) == 1
    got = await delivered_to_second(routed, "django", Priority.LOW)
    assert b"Your weekly digest." in got.data


# -- curl ---------------------------------------------------------------------------


async def test_curl(routed: Routed, tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    _, version = await run("curl", "--version")
    protocols = next((line for line in version.splitlines() if line.startswith("Protocols:")), "")
    if "smtp" not in protocols.split():
        pytest.skip(f"this curl was built without SMTP support ({protocols.strip()})")
    msg = tmp_path / "msg.txt"
    # An SMTP message has CRLF line ends; relay refuses bare LFs (docs/clients.md).
    msg.write_bytes(textwrap.dedent(f"""\
        From: {SENDER}
        To: {RECIPIENT}
        Subject: curl
        X-Account: second
        X-Priority: 1

        Sent with curl.
        """).replace("\n", "\r\n").encode())
    code, out = await run(
        "curl", "--silent", "--show-error", f"smtp://127.0.0.1:{routed.port}",
        "--mail-from", SENDER, "--mail-rcpt", RECIPIENT, "--upload-file", str(msg),
    )
    assert code == 0, out
    got = await delivered_to_second(routed, "curl", Priority.HIGH)
    assert b"Sent with curl." in got.data


async def test_curl_with_crlf_option_converts_a_unix_file(routed: Routed, tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    msg = tmp_path / "msg.txt"
    msg.write_text(f"From: {SENDER}\nTo: {RECIPIENT}\nSubject: curl\nX-Account: second\n"
                   "X-Priority: 1\n\nWritten with LF line ends.\n")
    code, out = await run(
        "curl", "--silent", "--show-error", f"smtp://127.0.0.1:{routed.port}", "--crlf",
        "--mail-from", SENDER, "--mail-rcpt", RECIPIENT, "--upload-file", str(msg),
    )
    if code != 0 and "Protocol" in out and "smtp" in out:
        pytest.skip(f"this curl was built without SMTP support: {out.strip()}")
    assert code == 0, out
    got = await delivered_to_second(routed, "curl", Priority.HIGH)
    assert b"Written with LF line ends.\r\n" in got.data


# -- swaks --------------------------------------------------------------------------


async def test_swaks(routed: Routed) -> None:
    if shutil.which("swaks") is None:
        pytest.skip("swaks is not installed (Debian: apt-get install swaks)")
    code, out = await run(
        "swaks", "--server", f"127.0.0.1:{routed.port}",
        "--from", SENDER, "--to", RECIPIENT,
        "--header", "Subject: swaks", "--header", "X-Account: second",
        "--header", "X-Priority: 1", "--body", "Sent with swaks.",
    )
    assert code == 0, out
    assert "250 2.0.0 queued as " in out
    got = await delivered_to_second(routed, "swaks", Priority.HIGH)
    assert b"Sent with swaks." in got.data


# -- Node.js: nodemailer ------------------------------------------------------------

NODEMAILER_SCRIPT = """\
const nodemailer = require("nodemailer");

const transporter = nodemailer.createTransport({
  host: "127.0.0.1",
  port: Number(process.argv[2]),
  secure: false,
});

transporter.sendMail({
  from: "app@example.com",
  to: "user@example.com",
  subject: "nodemailer",
  text: "Sent with nodemailer.",
  priority: "high",
  headers: { "X-Account": "second" },
}).then(
  (info) => console.log(info.response),
  (err) => { console.error(err); process.exit(1); },
);
"""


async def test_nodemailer(routed: Routed, tmp_path: Path) -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed")
    try:
        # Few, short retries: an unreachable registry ends in a skip, not in the timeout.
        code, out = await run("npm", "install", "--no-audit", "--no-fund", "--no-save",
                              "--loglevel=error", "--fetch-retries=1", "--fetch-timeout=20000",
                              "nodemailer", cwd=tmp_path, timeout=40)
    except TimeoutError:
        pytest.skip("npm install nodemailer took more than 40 s")
    if code != 0:
        pytest.skip(f"npm install nodemailer failed: {out.strip()[-300:]}")
    (tmp_path / "send.js").write_text(NODEMAILER_SCRIPT)
    code, out = await run("node", "send.js", str(routed.port), cwd=tmp_path)
    assert code == 0, out
    assert out.startswith("250 2.0.0 queued as "), out
    got = await delivered_to_second(routed, "nodemailer", Priority.HIGH)
    assert b"Sent with nodemailer." in got.data
    assert b"\r\nX-Priority: 1 (Highest)\r\n" in got.data  # what priority: "high" writes
