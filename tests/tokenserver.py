"""A real OAuth2 token endpoint (aiohttp on 127.0.0.1, port 0) for XOAUTH2 tests.

It checks the form relay posts (grant, client id and secret, refresh token or scope),
issues numbered short-lived tokens, and tells the FakeUpstream to accept each one for
as long as it lasts::

    async with TokenServer(upstream, lifetime=2) as tokens:
        ...  # auth: {token_url: tokens.url, client_id: tokens.client_id, ...}
        assert tokens.issued == ["token-1"]
"""

from __future__ import annotations

import ssl
from types import TracebackType
from typing import Self

from aiohttp import web

from tests.upstream import FakeUpstream


class TokenServer:
    def __init__(self, upstream: FakeUpstream, *, lifetime: float = 3600.0,
                 client_id: str = "relay-test-client", client_secret: str = "client-s3cret",
                 refresh_token: str = "refresh-s3cret",
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.upstream = upstream
        self.lifetime = lifetime  # expires_in of each token issued
        self.client_id = client_id
        self.client_secret = client_secret
        self.refresh_token = refresh_token
        self.requests: list[dict[str, str]] = []  # each form posted
        self.issued: list[str] = []
        self.refuse_next = 0  # answer this many requests 400 invalid_grant
        self.url = ""
        self._ssl = ssl_context  # https with this certificate
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_post("/token", self._token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._ssl)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"{'https' if self._ssl else 'http'}://127.0.0.1:{port}/token"
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _token(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.requests.append(form)
        if self.refuse_next > 0:
            self.refuse_next -= 1
            return web.json_response({"error": "invalid_grant",
                                      "error_description": "Token has been expired or revoked."},
                                     status=400)
        if form.get("client_id") != self.client_id:
            return web.json_response({"error": "invalid_client"}, status=401)
        grant = form.get("grant_type")
        if grant == "refresh_token":
            ok = form.get("refresh_token") == self.refresh_token and form.get(
                "client_secret", self.client_secret) == self.client_secret
        elif grant == "client_credentials":
            ok = form.get("client_secret") == self.client_secret and bool(form.get("scope"))
        else:
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        if not ok:
            return web.json_response({"error": "invalid_grant"}, status=400)
        token = f"token-{len(self.issued) + 1}"
        self.issued.append(token)
        self.upstream.accept_token(token, self.lifetime)
        return web.json_response({"access_token": token, "token_type": "Bearer",
                                  "expires_in": self.lifetime})
