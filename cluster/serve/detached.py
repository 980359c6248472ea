"""Ray calls and tasks an ingress request starts that must not be cancelled with it.

Serve cancels a request whose client went away, and Ray then cancels every call that request's task
made, recursively: it finds them through a context variable each call inherits from the asyncio
task that made it. Cleanup a cancelled request sends on its way out (abort its sequence on the
worker, release its slot) would be cancelled with it, and a long-lived task one request happened to
start (the replica's output stream from a worker) would be cut when that request is. Both run here
in an empty context, so they belong to no request.
"""
from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def call(submit: Callable[..., T], *args: Any) -> T:
    """`submit(*args)` (an actor method's `.remote`) as no request's child."""
    return contextvars.Context().run(submit, *args)


def task(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """Run `coro` as a task of the running loop that no request's cancellation reaches."""
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
