"""HTTP errors in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}`.

Routes raise `APIError`; the app's exception handlers turn it (and pydantic
validation errors, engine `RequestError`s and starlette's 404/405) into a JSON
response with the right status. Once a stream has started the status line is
gone, so `error_chunk` writes the same object as one SSE event instead.
"""
from __future__ import annotations

import json
import logging
import sys
from http import HTTPStatus

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from tpserve.engine.errors import RequestError

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error the client caused or must handle; carries its HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type_: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after  # seconds, sent as Retry-After
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_validation_error(exc: ValidationError) -> APIError:
    """The first pydantic error, phrased for a client: which field, what is wrong."""
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return bad_request(f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "),
                           code="invalid_json")
    loc = ".".join(str(p) for p in first["loc"])
    message = first["msg"]
    if loc:
        message = f"{loc}: {message}"
    more = len(exc.errors()) - 1
    if more:
        message += f" (and {more} more error{'s' if more > 1 else ''})"
    return bad_request(message, param=loc or None)


def _engine_dead_error() -> type | None:
    # only loaded with the real engine; no engine loaded means no such error to map
    module = sys.modules.get("tpserve.engine.async_engine")
    return getattr(module, "EngineDeadError", None)


def to_api_error(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    dead = _engine_dead_error()
    if dead is not None and isinstance(exc, dead):
        return APIError(503, f"the engine is not running ({exc}); the server must be restarted",
                        type_="service_unavailable")
    if isinstance(exc, ValidationError):
        return from_validation_error(exc)
    if isinstance(exc, RequestError):
        return bad_request(str(exc))
    if isinstance(exc, HTTPException):
        message = exc.detail if exc.detail else HTTPStatus(exc.status_code).phrase
        return APIError(exc.status_code, str(message))
    return APIError(500, f"internal server error: {type(exc).__name__}: {exc}", type_="server_error")


def error_response(exc: Exception) -> JSONResponse:
    err = to_api_error(exc)
    headers = {}
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if err.retry_after is not None:
        headers["Retry-After"] = str(err.retry_after)
    return JSONResponse(err.body(), status_code=err.status, headers=headers or None)


async def handle_exception(request: Request, exc: Exception) -> JSONResponse:
    response = error_response(exc)
    if response.status_code >= 500:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return response


def error_chunk(exc: Exception) -> str:
    """One SSE event carrying the error object (for errors after the stream began)."""
    return f"data: {json.dumps(to_api_error(exc).body())}\n\n"


EXCEPTION_HANDLERS = {
    APIError: handle_exception,
    ValidationError: handle_exception,
    RequestError: handle_exception,
    HTTPException: handle_exception,
    RuntimeError: handle_exception,  # the engine's EngineDeadError -> 503, without a re-raise
    Exception: handle_exception,
}
