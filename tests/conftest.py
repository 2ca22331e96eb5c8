"""Shared fixtures: a real fault-injecting upstream, a relay App on free ports, a client."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import ssl
import subprocess
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosmtplib
import aiosqlite
import pytest
from prometheus_client import CollectorRegistry

from relay.app import App, WorkerRole
from relay.config.loading import parse_config
from relay.config.schema import Config
from relay.queue.types import NewMessage, Priority, new_queue_id
from tests.upstream import FakeUpstream
from tests.webhook import WebhookReceiver

if TYPE_CHECKING:  # (relayproc imports this module)
    from tests.relayproc import RelayProcess

FAST_RETRY = {"initial_delay": "100ms", "max_delay": "1s", "max_age": "30s", "jitter": 0}
FAST_AUTH_BACKOFF = {"initial": "100ms", "max": "1s"}  # the default's 1 minute is for real use


def upstream_account(up: FakeUpstream, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    """An account block for a FakeUpstream: plain SMTP with AUTH on loopback."""
    secret = tmp_path / f"upstream-{up.port}.secret"
    secret.write_text(up.password)
    secret.chmod(0o600)
    block: dict[str, Any] = {
        "host": up.host,
        "port": up.port,
        "tls": "none",
        "username": up.username,
        "password_file": str(secret),
    }
    if up.username is None:
        del block["username"], block["password_file"]
    block.update(extra)
    return block


_QUEUE_OVERRIDE: dict[str, Any] | None = None  # set by the each_store fixture


def relay_config(tmp_path: Path, accounts: dict[str, Any], **sections: Any) -> Config:
    """A config on free ports with a queue under tmp_path; the first account is the default."""
    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "queue": dict(_QUEUE_OVERRIDE) if _QUEUE_OVERRIDE else
        {"path": str(tmp_path / "queue.sqlite3")},
        "retry": dict(FAST_RETRY),
        "auth_backoff": dict(FAST_AUTH_BACKOFF),
        "accounts": accounts,
        "routing": {"default_account": next(iter(accounts))},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_config(data)


def _sqlite_workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "_connection_worker_thread" in t.name]


@pytest.fixture(autouse=True)
def no_leaked_sqlite_connections() -> Any:
    """Fail the test that leaves an aiosqlite connection open.

    aiosqlite's worker thread is not a daemon: one connection left open keeps the
    interpreter from exiting, so the leak would show only as a CI run that never ends.
    """
    before = set(_sqlite_workers())
    yield
    leaked = [t for t in _sqlite_workers() if t not in before]
    for thread in leaked:
        thread.join(timeout=2.0)
    leaked = [t for t in leaked if t.is_alive()]
    if leaked:
        # Stop them so that the rest of the run, and its exit, go on.
        for obj in gc.get_objects():
            if isinstance(obj, aiosqlite.Connection) and obj._thread in leaked:
                obj.stop()
        pytest.fail(f"{len(leaked)} aiosqlite connection(s) left open by this test")


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as up:
        yield up


StartRelay = Callable[..., Awaitable[App]]


@pytest.fixture
async def start_relay() -> AsyncIterator[StartRelay]:
    """start_relay(config) -> a started App (on free ports); all are shut down at the end.
    ``worker``: one of several processes on the queue (two Apps on one file stand for two
    workers of `relay serve --workers 2`)."""
    apps: list[App] = []

    async def start(config: Config, worker: WorkerRole | None = None) -> App:
        app = App(config, registry=CollectorRegistry(), worker=worker)
        await app.startup()
        apps.append(app)
        return app

    yield start
    for app in reversed(apps):
        await app.shutdown(grace=2.0)


async def send(
    port: int,
    body: bytes | str,
    *,
    sender: str = "app@example.com",
    recipients: list[str] | None = None,
    host: str = "127.0.0.1",
    mail_options: list[str] | None = None,
    login: tuple[str, str] | None = None,
) -> tuple[int, str]:
    """One message over one connection to the relay (``login``: as this listener user,
    password); returns the reply to DATA."""
    data = body.encode() if isinstance(body, str) else body
    client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=30)
    async with client:
        if login is not None:
            await client.login(*login)
        try:
            _, reply = await client.sendmail(sender, recipients or ["to@example.com"], data,
                                             mail_options=mail_options)
        except aiosmtplib.SMTPResponseException as exc:
            return exc.code, exc.message
    code, _, text = ("250 " + reply).partition(" ")
    return int(code), text


def message(subject: str = "test", *, headers: dict[str, str] | None = None,
            body: str = "hello\r\n") -> bytes:
    lines = [f"Subject: {subject}", "From: app@example.com", "To: to@example.com"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def new_message(now: float, account: str = "up",
                priority: Priority = Priority.NORMAL) -> NewMessage:
    """A small message to enqueue straight into a store (tests of the store itself)."""
    return NewMessage(id=new_queue_id(), sender="app@example.com",
                      recipients=("to@example.com",), account=account, priority=priority,
                      body=b"Subject: x\r\n\r\nhi\r\n", created_at=now, not_before=now)


def metric(app: App, name: str, **labels: str) -> float:
    value = app.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


os.environ.setdefault("RELAY_TEST", "1")


async def send_many(port: int, bodies: list[bytes], *, sessions: int = 5,
                    recipients: list[str] | None = None) -> list[tuple[int, str]]:
    """Send over `sessions` persistent connections at once; replies in input order."""
    replies: list[tuple[int, str]] = [(0, "")] * len(bodies)

    async def session(indexes: list[int]) -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=30)
        async with client:
            for i in indexes:
                try:
                    _, reply = await client.sendmail(
                        "app@example.com", recipients or ["to@example.com"], bodies[i]
                    )
                    replies[i] = (250, reply)
                except aiosmtplib.SMTPResponseException as exc:
                    replies[i] = (exc.code, exc.message)

    chunks = [list(range(len(bodies)))[k::sessions] for k in range(sessions)]
    await asyncio.gather(*(session(c) for c in chunks if c))
    return replies


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0,
                     what: str = "condition") -> None:
    """Wait for a condition that no event announces (a metric, a queue state)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


@dataclass(frozen=True)
class PrivateCA:
    """A CA made for one test, and a server certificate it signed for 127.0.0.1/localhost."""

    ca_cert: Path
    server_context: ssl.SSLContext  # for a FakeUpstream that offers STARTTLS


@pytest.fixture
def private_ca(tmp_path: Path) -> PrivateCA:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make certificates")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=relay test CA", "-keyout", "ca.key", "-out", "ca.pem")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", "server.key", "-out", "server.csr")
    (tmp_path / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "1", "-extfile", "san.ext", "-out", "server.pem")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    return PrivateCA(tmp_path / "ca.pem", context)


Launch = Callable[..., Awaitable["RelayProcess"]]


@pytest.fixture
async def launch(tmp_path: Path) -> AsyncIterator[Launch]:
    """launch(config, *options) -> a running `relay serve` (not yet waited for); all killed
    at the end."""
    from tests.relayproc import RelayProcess

    started: list[RelayProcess] = []

    async def run(config: Path, *options: str) -> RelayProcess:
        relay = await RelayProcess.spawn(config, cwd=tmp_path, options=options)
        started.append(relay)
        return relay

    yield run
    for relay in started:
        await relay.kill()


WEBHOOK_SECRET = "webhook-test-secret"


@pytest.fixture
async def webhook() -> AsyncIterator[WebhookReceiver]:
    """A real aiohttp webhook receiver on a free port that verifies signatures."""
    async with WebhookReceiver(WEBHOOK_SECRET) as receiver:
        yield receiver


def webhook_block(receiver: WebhookReceiver, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    """An events.webhooks entry for a WebhookReceiver, its secret in a file, fast retries."""
    secret = tmp_path / "webhook.secret"
    secret.write_text(receiver.secret)
    secret.chmod(0o600)
    return {"url": receiver.url, "name": "test", "secret_file": str(secret),
            "timeout": "2s", "retry_initial": "100ms", "retry_max": "500ms", **extra}


# -- PostgreSQL: the store-level tests run on both stores -----------------------------
STORES = ["sqlite", "postgres"]


@pytest.fixture(scope="session")
def pg_cluster() -> Any:
    """A private PostgreSQL cluster for the whole run; skips when PostgreSQL is missing."""
    from tests.pgcluster import Cluster, missing_reason

    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    cluster = Cluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def pg_url(pg_cluster: Any) -> str:
    """A fresh database of its own for one test."""
    return str(pg_cluster.create_database())


@pytest.fixture(params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


MakeStore = Callable[..., Any]


@pytest.fixture
def make_store(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> MakeStore:
    """make_store(owner=..., lock=...) -> an unopened QueueStore of this test's kind, all
    on one queue (one SQLite file, or one PostgreSQL database)."""
    from relay.queue.sqlite.store import SQLiteStore

    if store_kind == "sqlite":
        def sqlite(**kw: Any) -> Any:
            return SQLiteStore(tmp_path / "queue.sqlite3", **kw)
        return sqlite
    from relay.queue.postgres.store import PostgresStore

    url = request.getfixturevalue("pg_url")

    def postgres(*, lock: bool = True, role: str = "", owner: str | None = None,
                 **kw: Any) -> Any:
        return PostgresStore(url, owner=owner, role=role, **kw)
    return postgres


# Two stores on one queue, opened: two worker processes (SQLite) or two relays
# (PostgreSQL), each its own owner. Closing one in the test is its process gone.
TwoWorkers = tuple[Any, Any]


@pytest.fixture
async def two_workers(make_store: MakeStore) -> AsyncIterator[TwoWorkers]:
    a = make_store(lock=False, owner="worker-a")
    b = make_store(lock=False, owner="worker-b")
    await a.open()
    await b.open()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def queue_section(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
                  ) -> dict[str, Any]:
    """The config's queue block for this test's store kind."""
    if store_kind == "sqlite":
        return {"path": str(tmp_path / "queue.sqlite3")}
    return {"url": request.getfixturevalue("pg_url"), "connect_timeout": "1s",
            "statement_timeout": "2s"}


@pytest.fixture
def each_store(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
               ) -> Iterator[str]:
    """The test once on SQLite and once on PostgreSQL: relay_config() gives the queue
    block of this run's store (usefixtures("each_store") on a test that builds its
    config with relay_config)."""
    global _QUEUE_OVERRIDE
    if store_kind == "postgres":
        _QUEUE_OVERRIDE = queue_section(store_kind, tmp_path, request)
    try:
        yield store_kind
    finally:
        _QUEUE_OVERRIDE = None
