"""A real webhook receiver for tests: aiohttp on 127.0.0.1 (port 0) in the current loop.

It checks each POST's signature the way docs/events.md tells receivers to, records the
events it accepted, and can be told to fail::

    async with WebhookReceiver("s3cret") as hook:
        hook.fail_next(2)            # 500 to the next two POSTs
        ...                          # point events.webhooks[].url at hook.url
        await hook.wait_for(1)
        assert hook.events[0]["type"] == "delivered"
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from types import TracebackType
from typing import Any, Self

from aiohttp import web


class WebhookReceiver:
    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.events: list[dict[str, Any]] = []  # accepted, in arrival order
        self.posts = 0  # every POST, failed ones too
        self.bad_signatures = 0
        self.headers: list[dict[str, str]] = []
        self._fail = 0
        self._status = 500
        self._delay = 0.0
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def fail_next(self, times: int, status: int = 500) -> None:
        self._fail, self._status = times, status

    def delay(self, seconds: float) -> None:
        """Answer each POST this much later (a slow receiver)."""
        self._delay = seconds

    def verify(self, stamp: str, body: bytes, signature: str) -> bool:
        """docs/events.md's check: HMAC-SHA256 of "<timestamp>.<body>" with the secret."""
        expected = hmac.new(self.secret.encode(), stamp.encode() + b"." + body,
                            hashlib.sha256).hexdigest()
        return hmac.compare_digest(f"sha256={expected}", signature)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.posts += 1
        self.headers.append(dict(request.headers))
        if self._delay:
            await asyncio.sleep(self._delay)
        if not self.verify(request.headers.get("X-Relay-Timestamp", ""), body,
                           request.headers.get("X-Relay-Signature", "")):
            self.bad_signatures += 1
            return web.Response(status=401, text="bad signature")
        if self._fail > 0:
            self._fail -= 1
            return web.Response(status=self._status, text="injected failure")
        async with self._arrived:
            self.events.append(json.loads(body))
            self._arrived.notify_all()
        return web.Response(status=204)

    async def wait_for(self, n: int, timeout: float = 10.0) -> None:
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: len(self.events) >= n),
                                   timeout)

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
