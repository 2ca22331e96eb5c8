"""The client examples of docs/clients.md, read from the page and run against a real relay.

Each code block on the page carries a marker comment on the line above it:
``<!-- test: NAME -->`` for a block a test here runs, ``<!-- not tested: why -->`` for the
rest. The tests change nothing in a block but the port (2525, the listener's default, becomes
the test relay's), so a broken example on the page is a failing test. The relay has the
accounts the examples name (`ses`, `newsletter`) on one upstream, and a default account
`main` on another: the message must arrive through the named account, without its
X-Account header, with the priority its headers ask for. Clients that are not installed
here are skipped, saying what is missing; .ci/run installs all of them.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import smtplib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email import message_from_bytes
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest

from relay.app import App
from relay.queue.types import Priority
from tests.conftest import StartRelay, relay_config, upstream_account
from tests.upstream import FakeUpstream, Received

ROOT = Path(__file__).resolve().parent.parent
CLIENTS_DOC = ROOT / "docs" / "clients.md"
CI_SCRIPT = ROOT / ".ci" / "run"
SENDER, RECIPIENT = "app@example.com", "user@example.com"
DOC_PORT = "2525"

# Where .ci/run installs nodemailer (npm install --prefix), and which release: a major
# that still runs on Debian 12's Node 18 as well as on Node 20.
NODE_PREFIX = Path(os.environ.get("RELAY_TEST_NODE_PREFIX")
                   or Path.home() / ".cache" / "relay-tests" / "node")
NODEMAILER = "nodemailer@9"

_MARKER = re.compile(r"^<!--\s*(test|not tested):\s*(.+?)\s*-->$")
_FENCE = re.compile(r"^```(\w*)$")


# -- the page -----------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    marker: str  # "test" or "not tested"
    name: str  # the test's name for the block, or why it is not run
    lang: str
    code: str
    line: int  # of the opening fence, for messages


def page_blocks() -> list[Block]:
    """Every fenced code block of docs/clients.md with the marker above it."""
    lines = CLIENTS_DOC.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        end = lines.index("```", i + 1)
        marker = _MARKER.match(lines[i - 1]) if i else None
        kind, name = marker.groups() if marker else ("", "")
        blocks.append(Block(kind, name, fence.group(1), "\n".join(lines[i + 1:end]) + "\n",
                            i + 1))
        i = end + 1
    return blocks


def snippet(name: str, port: int | None) -> str:
    """The block marked ``<!-- test: name -->``, with the documented port made ``port``.

    port=None: a block that names no port (it takes it from another block).
    """
    (block,) = [b for b in page_blocks() if b.marker == "test" and b.name == name]
    if port is None:
        assert DOC_PORT not in block.code
        return block.code
    assert DOC_PORT in block.code, f"docs/clients.md:{block.line}: {name} names no port 2525"
    return block.code.replace(DOC_PORT, str(port))


# Every block a test below runs, so that a block marked for a test no test runs is caught.
RUN_HERE = {"smtplib", "django-settings", "django-send", "nodemailer", "swaks", "curl",
            "curl-crlf", "phpmailer"}


def test_every_block_on_the_page_is_run_or_says_why_not() -> None:
    blocks = page_blocks()
    unmarked = [b.line for b in blocks if not b.marker]
    assert unmarked == [], f"docs/clients.md: code blocks without a marker at lines {unmarked}"
    tested = [b.name for b in blocks if b.marker == "test"]
    assert sorted(tested) == sorted(RUN_HERE)  # each once, and each has its test here


# -- a relay with the accounts the examples name ------------------------------------


@dataclass
class Routed:
    app: App
    main: FakeUpstream  # the default account's upstream
    named: FakeUpstream  # the upstream of the accounts the examples name in X-Account

    @property
    def port(self) -> int:
        return self.app.smtp_port


@pytest.fixture
async def named_upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(username="named", password="named-secret") as up:
        yield up


@pytest.fixture
async def routed(upstream: FakeUpstream, named_upstream: FakeUpstream,
                 start_relay: StartRelay, tmp_path: Path) -> Routed:
    config = relay_config(tmp_path, {
        "main": upstream_account(upstream, tmp_path),
        "ses": upstream_account(named_upstream, tmp_path),
        "newsletter": upstream_account(named_upstream, tmp_path),
    })
    return Routed(await start_relay(config), upstream, named_upstream)


async def delivered_through(routed: Routed, account: str, subject: str,
                            priority: Priority) -> Received:
    """The message arrived through ``account`` only, without X-Account, with its priority."""
    await routed.named.wait_for_messages(1)
    got = routed.named.messages[0]
    assert routed.main.messages == []
    assert got.mail_from == SENDER and got.rcpt_tos == (RECIPIENT,)
    headers = message_from_bytes(got.data, policy=default_policy)
    assert headers["Subject"] == subject
    assert headers["X-Account"] is None
    assert b"\nx-account:" not in got.data.lower()
    (record,) = await routed.app.store.list_messages()
    assert record.account == account
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


def run_python(code: str, name: str) -> dict[str, Any]:
    """Run a Python block as a script of its own; its globals, for the settings block."""
    namespace: dict[str, Any] = {"__name__": f"docs_clients_{name}"}
    exec(compile(code, f"docs/clients.md ({name})", "exec"), namespace)
    return namespace


# -- Python: smtplib ----------------------------------------------------------------


async def test_python_smtplib(routed: Routed) -> None:
    code = snippet("smtplib", routed.port)
    await asyncio.to_thread(run_python, code, "smtplib")
    got = await delivered_through(routed, "ses", "Your password reset code", Priority.HIGH)
    assert b"Your password reset code is 123456." in got.data


async def test_python_smtplib_sees_an_unknown_account_at_once(routed: Routed) -> None:
    """As the page says: a misspelt account raises SMTPDataError 550, nothing is queued."""
    code = snippet("smtplib", routed.port)
    assert code.count('"ses"') == 1
    with pytest.raises(smtplib.SMTPDataError) as refused:
        await asyncio.to_thread(run_python, code.replace('"ses"', '"sse"'), "smtplib")
    assert refused.value.smtp_code == 550
    assert b"unknown account 'sse'" in refused.value.smtp_error
    assert await routed.app.store.list_messages() == []


# -- Django -------------------------------------------------------------------------


def django_send(settings_code: str, send_code: str) -> None:
    """The settings.py block as Django's settings, then the sending block."""
    from django.conf import settings

    values = {k: v for k, v in run_python(settings_code, "django-settings").items()
              if k.isupper()}
    if settings.configured:  # by an earlier run in this process: the port differs
        for key, value in values.items():
            setattr(settings, key, value)
    else:
        settings.configure(**values)
    run_python(send_code, "django-send")


async def test_django_smtp_backend(routed: Routed) -> None:
    pytest.importorskip("django", reason="Django is not installed (pip install -e '.[test]')")
    await asyncio.to_thread(django_send, snippet("django-settings", routed.port),
                            snippet("django-send", None))  # it uses EMAIL_PORT
    got = await delivered_through(routed, "newsletter", "Your weekly digest", Priority.LOW)
    body = message_from_bytes(got.data, policy=default_policy)
    assert body.get_payload().strip() == "..."
    assert body["From"] == SENDER  # DEFAULT_FROM_EMAIL


# -- Node.js: nodemailer ------------------------------------------------------------


async def run_node(tmp_path: Path, code: str) -> tuple[int, str]:
    """As the page says: an ES module, send.mjs, with nodemailer in node_modules beside it
    (ES modules resolve packages from there, not from NODE_PATH)."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed (Debian: apt-get install nodejs)")
    modules = NODE_PREFIX / "node_modules"
    if not (modules / "nodemailer" / "package.json").is_file():
        pytest.skip(f"nodemailer is not installed in {NODE_PREFIX} (.ci/run does it:"
                    f" npm install --prefix {NODE_PREFIX} {NODEMAILER})")
    (tmp_path / "node_modules").symlink_to(modules, target_is_directory=True)
    (tmp_path / "send.mjs").write_text(code)
    return await run("node", "send.mjs", cwd=tmp_path)


async def test_nodemailer(routed: Routed, tmp_path: Path) -> None:
    code, out = await run_node(tmp_path, snippet("nodemailer", routed.port))
    assert code == 0, out
    assert out.startswith("250 2.0.0 queued as "), out
    got = await delivered_through(routed, "ses", "Your password reset code", Priority.HIGH)
    assert b"Your password reset code is 123456." in got.data
    assert b"\r\nX-Priority: 1 (Highest)\r\n" in got.data  # what priority: "high" writes


async def test_nodemailer_sees_an_unknown_account_at_once(routed: Routed,
                                                         tmp_path: Path) -> None:
    """As the page says: sendMail rejects with relay's code and reply; the script fails."""
    block = snippet("nodemailer", routed.port)
    assert block.count('"ses"') == 1
    code, out = await run_node(tmp_path, block.replace('"ses"', '"sse"'))
    assert code != 0
    assert "responseCode: 550" in out, out
    assert "unknown account 'sse'" in out, out
    assert await routed.app.store.list_messages() == []


# -- swaks --------------------------------------------------------------------------


async def test_swaks(routed: Routed, tmp_path: Path) -> None:
    if shutil.which("swaks") is None:
        pytest.skip("swaks is not installed (Debian: apt-get install swaks)")
    code, out = await run("sh", "-ec", snippet("swaks", routed.port), cwd=tmp_path)
    assert code == 0, out
    assert "250 2.0.0 queued as " in out  # "It prints the whole SMTP conversation"
    got = await delivered_through(routed, "ses", "Test", Priority.HIGH)
    assert b"Sent with swaks." in got.data


# -- curl ---------------------------------------------------------------------------


async def skip_without_smtp_curl() -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (Debian: apt-get install curl)")
    _, version = await run("curl", "--version")
    protocols = next((line for line in version.splitlines() if line.startswith("Protocols:")), "")
    if "smtp" not in protocols.split():
        pytest.skip(f"this curl was built without SMTP support ({protocols.strip()})")


async def test_curl(routed: Routed, tmp_path: Path) -> None:
    await skip_without_smtp_curl()
    code, out = await run("sh", "-ec", snippet("curl", routed.port), cwd=tmp_path)
    assert code == 0, out
    got = await delivered_through(routed, "ses", "Test", Priority.HIGH)
    assert b"\r\n\r\nSent with curl.\r\n" in got.data


async def test_curl_with_crlf_option_converts_a_unix_file(routed: Routed, tmp_path: Path) -> None:
    await skip_without_smtp_curl()
    # "A file written with an editor": the block's msg-with-lf.txt, LF line ends.
    (tmp_path / "msg-with-lf.txt").write_bytes(
        f"From: {SENDER}\nTo: {RECIPIENT}\nSubject: Test\nX-Account: ses\nX-Priority: 1\n"
        "\nWritten with LF line ends.\n".encode())
    code, out = await run("sh", "-ec", snippet("curl-crlf", routed.port), cwd=tmp_path)
    assert code == 0, out
    got = await delivered_through(routed, "ses", "Test", Priority.HIGH)
    assert b"\r\n\r\nWritten with LF line ends.\r\n" in got.data


# -- PHP: PHPMailer -----------------------------------------------------------------

# Debian's libphp-phpmailer, which .ci/run installs; elsewhere, Composer's vendor/.
PHPMAILER_AUTOLOAD = Path(os.environ.get("RELAY_TEST_PHPMAILER_AUTOLOAD")
                          or "/usr/share/php/libphp-phpmailer/autoload.php")


async def run_php(routed: Routed, tmp_path: Path, code: str,
                  *php_options: str) -> tuple[int, str]:
    """The block as send.php beside a Composer-style vendor/autoload.php."""
    write_php(tmp_path, code)
    return await run("php", *php_options, "send.php", cwd=tmp_path)


def write_php(tmp_path: Path, code: str) -> None:
    if shutil.which("php") is None:
        pytest.skip("php is not installed (Debian: apt-get install php-cli)")
    if not PHPMAILER_AUTOLOAD.is_file():
        pytest.skip(f"PHPMailer is not installed: no {PHPMAILER_AUTOLOAD}"
                    " (Debian: apt-get install libphp-phpmailer)")
    (tmp_path / "vendor").mkdir()
    (tmp_path / "vendor" / "autoload.php").write_text(
        f"<?php\nrequire {str(PHPMAILER_AUTOLOAD)!r};\n")
    (tmp_path / "send.php").write_text(code)


async def test_phpmailer(routed: Routed, tmp_path: Path) -> None:
    code, out = await run_php(routed, tmp_path, snippet("phpmailer", routed.port))
    assert code == 0, out
    got = await delivered_through(routed, "ses", "Your password reset code", Priority.HIGH)
    assert b"Your password reset code is 123456." in got.data


async def test_phpmailer_sees_an_unknown_account_at_once(routed: Routed, tmp_path: Path) -> None:
    """As the page says: PHPMailer throws its Exception; $mail->ErrorInfo has relay's reply.

    The block runs unchanged; a file PHP loads before it prints ErrorInfo at exit.
    """
    block = snippet("phpmailer", routed.port)
    assert block.count("'ses'") == 1
    (tmp_path / "show-error.php").write_text(
        "<?php register_shutdown_function(function () {"
        " echo 'ErrorInfo: ', $GLOBALS['mail']->ErrorInfo, PHP_EOL; });\n")
    code, out = await run_php(routed, tmp_path, block.replace("'ses'", "'sse'"),
                              "-d", "auto_prepend_file=show-error.php")
    assert code != 0
    assert "Uncaught PHPMailer\\PHPMailer\\Exception: SMTP Error: data not accepted." in out
    (error_info,) = [line for line in out.splitlines() if line.startswith("ErrorInfo: ")]
    assert "Detail: X-Account header names unknown account 'sse'" in error_info
    assert await routed.app.store.list_messages() == []


# -- what CI installs ---------------------------------------------------------------


def test_ci_installs_every_client_the_page_tests() -> None:
    """.ci/run installs the clients above, so that CI runs these tests, skipping none."""
    ci = CI_SCRIPT.read_text(encoding="utf-8")
    for package in ("nodejs", "npm", "swaks", "curl", "php-cli", "libphp-phpmailer"):
        assert re.search(rf"\b{package}\b", ci), package
    assert NODEMAILER in ci
    assert ".cache/relay-tests/node" in ci and "RELAY_TEST_NODE_PREFIX" in ci
