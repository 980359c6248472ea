"""Which web pages may call the API from a browser, as the spec's `serve.cors_allowed_origins` says;
none by default, so a page on any site cannot drive a server on the user's localhost.

A browser marks every request a page makes other than a plain GET with the page's `Origin`
(SDKs and curl send none). A POST from an origin that is not allowed is refused with a 403 before
it is read: CORS alone would only keep the page from reading the answer, and a page can send a
body without a Content-Type, which needs no preflight. For the allowed origins, the CORS answers
(preflights, the Access-Control-* headers) are Starlette's. The ingress's FastAPI app is built
when its module is imported, before a replica knows its spec, so this middleware is added then and
told the origins when the replica starts.
"""
from __future__ import annotations

from typing import Any

from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse

from .openai_protocol import OpenAIError

# Methods a page may send with any Origin: they read, and without CORS the page cannot read the answer
_READS = frozenset({"GET", "HEAD", "OPTIONS"})

_allowed: tuple[str, ...] = ()


def allow(origins: list[str] | tuple[str, ...]) -> None:
    """This process's allowed origins ("*": any)."""
    global _allowed
    _allowed = tuple(origins)


def allowed(origin: str) -> bool:
    return "*" in _allowed or origin in _allowed


class BrowserOrigins:
    """ASGI middleware: a request from a page of an origin not allowed is a 403 unless it only
    reads; for the allowed origins, Starlette's CORSMiddleware."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._cors: tuple[tuple[str, ...], CORSMiddleware] | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origin = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"origin"), None)
        if origin is not None and scope["method"] not in _READS and not allowed(origin):
            refusal = OpenAIError(403, f"requests from web pages of {origin[:100]!r} are not "
                                  "allowed (serve.cors_allowed_origins)", code="origin_not_allowed")
            await JSONResponse(refusal.body(), 403)(scope, receive, send)
            return
        if not _allowed:
            await self.app(scope, receive, send)
            return
        if self._cors is None or self._cors[0] != _allowed:
            self._cors = (_allowed, CORSMiddleware(
                self.app, allow_origins=list(_allowed), allow_methods=["GET", "HEAD", "POST"],
                allow_headers=["*"], expose_headers=["Retry-After"], max_age=600))
        await self._cors[1](scope, receive, send)
