"""The REST server as one starlette app: OpenAI routes, LMDeploy routes, health, metrics.

`build_api_app(serving, ...)` is used as-is by uvicorn (`--no-ray`) and inside the
Ray Serve replica. API keys, the body-size limit and CORS are pure ASGI
middleware, so streamed responses and client disconnects pass straight through.
"""
from __future__ import annotations

import hmac
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import routes_lmdeploy, routes_openai
from .errors_http import EXCEPTION_HANDLERS, APIError
from .routes_lmdeploy import SessionStore
from .serving_engine import ServingEngine

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
OPEN_PATHS = ("/health",)


@dataclass(frozen=True)
class APIOptions:
    api_keys: tuple[str, ...] = ()
    allow_origins: tuple[str, ...] = ()
    allow_credentials: bool = False
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


def _route_path(scope: Scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class APIKeyMiddleware:
    """401 unless `Authorization: Bearer <key>` names one of the keys (except /health)."""

    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...]) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _route_path(scope) in OPEN_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and any(hmac.compare_digest(token.strip(), k) for k in self.keys):
            await self.app(scope, receive, send)
            return
        message = ("invalid API key" if header else
                   "missing API key; send the header 'Authorization: Bearer <key>'")
        response = JSONResponse(APIError(401, message, code="invalid_api_key").body(), status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class BodyLimitMiddleware:
    """413 for request bodies over the limit, by Content-Length or as they stream in."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes

    def _too_large(self) -> APIError:
        return APIError(413, f"request body is larger than the server's limit of {self.limit} bytes",
                        code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await JSONResponse(self._too_large().body(), status_code=413)(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)


async def health(request: Request) -> Response:
    try:
        await request.app.state.serving.check_health()
    except Exception as exc:
        return JSONResponse(APIError(503, f"engine unhealthy: {exc}").body(), status_code=503)
    return Response(status_code=200)


async def metrics(request: Request) -> Response:
    serving: ServingEngine = request.app.state.serving
    body, content_type = serving.metrics.render(await serving.stats())
    return Response(body, media_type=content_type)


def build_api_app(serving: ServingEngine, options: APIOptions | None = None,
                  shutdown_engine: bool = False) -> Starlette:
    """The app; `shutdown_engine` makes the ASGI lifespan's end shut the engine down (uvicorn)."""
    options = options or APIOptions()

    @asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        if shutdown_engine:
            await serving.shutdown()

    middleware = []
    if options.allow_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(options.allow_origins),
                                     allow_credentials=options.allow_credentials,
                                     allow_methods=["*"], allow_headers=["*"]))
    if options.api_keys:
        middleware.append(Middleware(APIKeyMiddleware, api_keys=tuple(options.api_keys)))
    middleware.append(Middleware(BodyLimitMiddleware, max_body_bytes=options.max_body_bytes))
    routes = [Route("/health", health, methods=["GET"]), Route("/metrics", metrics, methods=["GET"])]
    app = Starlette(routes=routes + routes_openai.ROUTES + routes_lmdeploy.ROUTES,
                    middleware=middleware, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
    app.state.serving = serving
    app.state.sessions = SessionStore()
    app.state.created = int(time.time())
    return app
