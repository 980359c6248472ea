"""Which web pages may call the API from a browser (CORS), as the spec's `serve.cors_allowed_origins`
says; none by default, so a page on any site cannot drive a server on the user's localhost.

The ingress's FastAPI app is built when its module is imported, before a replica knows its spec, so
this middleware is added then and told the origins when the replica starts; the CORS answers
themselves (preflights, the Access-Control-* headers) are Starlette's.
"""
from __future__ import annotations

from typing import Any

from starlette.middleware.cors import CORSMiddleware

_allowed: tuple[str, ...] = ()


def allow(origins: list[str] | tuple[str, ...]) -> None:
    """This process's allowed origins ("*": any)."""
    global _allowed
    _allowed = tuple(origins)


class BrowserOrigins:
    """ASGI middleware: Starlette's CORSMiddleware for the allowed origins; with none, requests pass
    untouched (a preflight is then a 405, and a browser sends nothing more)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._cors: tuple[tuple[str, ...], CORSMiddleware] | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if not _allowed or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._cors is None or self._cors[0] != _allowed:
            self._cors = (_allowed, CORSMiddleware(
                self.app, allow_origins=list(_allowed), allow_methods=["GET", "HEAD", "POST"],
                allow_headers=["*"], expose_headers=["Retry-After"], max_age=600))
        await self._cors[1](scope, receive, send)
