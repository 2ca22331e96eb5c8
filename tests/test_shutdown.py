"""Graceful shutdown for orchestrators (issue 20, point 5): on SIGTERM /readyz fails first,
the listener keeps accepting for shutdown.drain_delay, then in-flight sends get
shutdown.grace; secret files mounted group-readable do not warn; password files are
re-read on reload (rotation)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from relay.config.report import config_warnings
from relay.queue.types import MessageState
from tests.conftest import StartRelay, message, relay_config, send, upstream_account
from tests.upstream import FakeUpstream


async def _readyz(port: int) -> tuple[int, str]:
    url = f"http://127.0.0.1:{port}/readyz"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.text()


async def test_stop_request_fails_readyz_keeps_accepting_then_gives_sends_the_grace(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    upstream.delay("DATA", 30)  # the upstream takes the message and never answers in time
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                          shutdown={"drain_delay": "500ms", "grace": "200ms"})
    app = await start_relay(config)
    code, text = await send(app.smtp_port, message("in flight"))
    assert code == 250, text
    await upstream.wait_for_messages(1)  # the send is in flight, waiting for the reply
    assert await _readyz(app.http_port) == (200, "ready\n")

    serving = asyncio.create_task(app.serve())
    app.request_stop()  # what SIGTERM does
    assert await _readyz(app.http_port) == (503, "not ready: shutting down\n")
    code, text = await send(app.smtp_port, message("during the drain"))
    assert code == 250, text  # still accepting: the load balancer has not noticed yet
    assert not serving.done()
    await serving

    async with asyncio.timeout(3):  # the config's 200 ms grace, not a hard-coded 5 s
        await app.shutdown()
    # Nothing lost: the send cut short and the message taken during the drain both wait
    # in the queue for the next start; one cut short says it may have been delivered.
    states = await _states(config.queue.path)
    assert len(states) == 2, states
    for state, error in states.values():
        assert state is MessageState.QUEUED or (
            state is MessageState.DEFERRED and "interrupted by shutdown" in error), states


async def _states(path: Path) -> dict[str, tuple[MessageState, str]]:
    from relay.queue.sqlite.store import SQLiteStore

    store = SQLiteStore(path, lock=False)
    await store.open()
    try:
        return {m.id: (m.state, m.last_error) for m in await store.list_messages()}
    finally:
        await store.close()


async def test_a_second_stop_request_skips_the_drain_delay(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                          shutdown={"drain_delay": "1h"})
    app = await start_relay(config)
    serving = asyncio.create_task(app.serve())
    app.request_stop()
    await asyncio.sleep(0)
    assert not serving.done()
    app.request_stop()  # a second SIGTERM (or Ctrl-C): stop now
    async with asyncio.timeout(5):
        await serving


def test_group_readable_secret_files_do_not_warn_world_readable_do(tmp_path: Path) -> None:
    """Kubernetes mounts secrets 0440/0640 for the pod's fsGroup: no warning on every
    start. A world-readable file still warns."""
    secret = tmp_path / "gmail"
    secret.write_text("app-password\n")
    config = relay_config(tmp_path, {"gmail": {"host": "smtp.example.com", "username": "u",
                                               "password_file": str(secret)}})
    for mode, warned in ((0o600, False), (0o440, False), (0o640, False), (0o644, True)):
        secret.chmod(mode)
        warnings = [w for w in config_warnings(config) if "password_file" in w]
        assert bool(warnings) is warned, (oct(mode), warnings)
    assert warnings == [f"accounts.gmail.password_file: {secret} is readable by every user"
                        " (chmod 600 or 640 it)"]


async def test_rotated_password_file_is_used_after_reload(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """Rotation as Kubernetes or an admin does it: the secret file's content changes, the
    upstream takes only the new password, SIGHUP (here: the reload it triggers) picks it
    up without a restart."""
    account = upstream_account(upstream, tmp_path)
    config = relay_config(tmp_path, {"up": account})
    app = await start_relay(config)
    assert (await send(app.smtp_port, message("old password")))[0] == 250
    await upstream.wait_for_messages(1)

    upstream.password = "rotated-password"
    await asyncio.to_thread(Path(account["password_file"]).write_text, "rotated-password\n")
    notes = await app.reload(relay_config(tmp_path, {"up": account}))  # re-reads the file
    assert notes == []
    assert (await send(app.smtp_port, message("new password")))[0] == 250
    await upstream.wait_for_messages(2)
    assert b"Subject: new password" in upstream.messages[-1].data
