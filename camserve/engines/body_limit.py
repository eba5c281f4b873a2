"""The bound on a request's body, for the ASGI apps that host camserve behind KServe's protocols.

KServe's model server sets no limit on the body: it reads and parses whatever comes. camserve's KServe adapter
(camserve.engines.kserve_model) and the KServe front of the tools (camserve_tools.kserve.front) both put this
middleware in front of it, so that a body over TorchServe's max_request_size gets the same 413 on every engine
before any of it is parsed. Each app answers the refusal in its own error body.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from camserve.protocol.decoding import RequestError

# ASGI's types, spelled as Starlette spells them, so that its responses and apps fit them.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
# The answer to a body over the limit (its status 413), given the request's scope and the limit in bytes.
Refusal = Callable[[Scope, int], ASGIApp]


def declared_too_large(declared: bytes | str | None, limit: int) -> bool:
    """Whether a declared Content-Length is over `limit`, or not a length at all (then nothing can be trusted)."""
    return declared is not None and (not declared.isdigit() or int(declared) > limit)


def body_too_large(limit: int) -> RequestError:
    """camserve's refusal of a body over this server's limit, the same on every engine."""
    return RequestError(f"the body is over this server's limit of {limit} bytes", status=413, kind="request_too_large")


def replayed(body: bytes, receive: Receive) -> Receive:
    """A receive channel that hands the app `body` whole, then whatever the client sends next (its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes is refused (`refusal`) by its declared length at once, else as
    soon as the bytes received pass the limit; the app never sees any of it. A body within the limit reaches the
    app whole, through `forward`, where a subclass may rewrite it."""

    def __init__(self, app: ASGIApp, limit: int, refusal: Refusal) -> None:
        self.app = app
        self.limit = limit
        self.refusal = refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if declared_too_large(dict(scope.get("headers") or []).get(b"content-length"), self.limit):
            await self.refusal(scope, self.limit)(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away: nobody to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self.refusal(scope, self.limit)(scope, receive, send)
                return
            if not message.get("more_body"):
                break
        await self.forward(scope, b"".join(chunks), receive, send)

    async def forward(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        """The request, its body read and within the limit, on to the app."""
        await self.app(scope, replayed(body, receive), send)
