"""Error bodies of the runner API and the handlers that turn exceptions into them.

Every error response has the body `{"message", "path", "statusCode", "timestamp", "code",
"method"}` of the Daytona runner API, including 401, 404 for unknown paths and 400 for
request bodies that do not validate.
"""

from __future__ import annotations

import datetime
import logging

import fastapi
import fastapi.exceptions
import starlette.exceptions
from fastapi.responses import JSONResponse

from sandbox_backup import errors
from sandbox_backup.runner.failures import FailureKind, RegistryTransferError
from sandbox_backup.runner.models import ErrorResponse

logger = logging.getLogger(__name__)

# HTTP status for each pull failure that `POST /sandboxes` can meet. A missing manifest
# or blob means the snapshot is broken (404); an unreachable registry may come back (502).
_PULL_FAILURE_STATUS = {
    FailureKind.MANIFEST_UNKNOWN: 404,
    FailureKind.BLOB_UNKNOWN: 404,
    FailureKind.AUTH_DENIED: 400,
    FailureKind.NAME_INVALID: 400,
    FailureKind.REGISTRY_UNREACHABLE: 502,
    FailureKind.TIMED_OUT: 504,
    FailureKind.REGISTRY_SERVER_ERROR: 502,
    FailureKind.CONTAINER_NOT_FOUND: 404,
    FailureKind.UNKNOWN: 502,
}


class ApiError(Exception):
    """An error response with a given HTTP status and machine-readable code."""

    def __init__(self, status_code: int, message: str, *, code: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.code = code


def error_response(request: fastapi.Request, status_code: int, message: str, code: str) -> JSONResponse:
    body = ErrorResponse(
        message=message,
        path=request.url.path,
        status_code=status_code,
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
        code=code,
        method=request.method,
    )
    return JSONResponse(status_code=status_code, content=body.to_json_dict())


def install_error_handlers(app: fastapi.FastAPI) -> None:
    """Register the handlers that give every error response the ErrorResponse body."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(fastapi.exceptions.RequestValidationError, _validation_error)
    app.add_exception_handler(starlette.exceptions.HTTPException, _http_exception)
    app.add_exception_handler(errors.SandboxBackupError, _domain_error)
    app.add_exception_handler(Exception, _unexpected_error)


async def _api_error(request: fastapi.Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(request, exc.status_code, exc.message, exc.code)


async def _validation_error(request: fastapi.Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, fastapi.exceptions.RequestValidationError)
    problems = []
    for problem in exc.errors():
        location = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
        problems.append(f"{location or 'body'}: {problem.get('msg', 'invalid')}")
    message = "invalid request: " + "; ".join(problems)
    return error_response(request, 400, message, "INVALID_REQUEST")


async def _http_exception(request: fastapi.Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, starlette.exceptions.HTTPException)
    return error_response(request, exc.status_code, str(exc.detail), f"HTTP_{exc.status_code}")


async def _domain_error(request: fastapi.Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.SandboxBackupError)
    status_code, code = _status_for(exc)
    if status_code >= 500:
        logger.warning(
            "%s %s failed: %s",
            request.method,
            request.url.path,
            exc,
            extra={"action": "http_error", "status_code": status_code, "path": request.url.path},
        )
    return error_response(request, status_code, str(exc), code)


async def _unexpected_error(request: fastapi.Request, exc: Exception) -> JSONResponse:
    logger.exception(
        "%s %s failed with an unexpected error",
        request.method,
        request.url.path,
        extra={"action": "http_error", "status_code": 500, "path": request.url.path},
    )
    return error_response(request, 500, f"internal error: {type(exc).__name__}: {exc}", "INTERNAL_ERROR")


def _status_for(exc: errors.SandboxBackupError) -> tuple[int, str]:
    if isinstance(exc, RegistryTransferError):
        return _PULL_FAILURE_STATUS[exc.kind], exc.kind.value
    if isinstance(exc, errors.InvalidReference):
        return 400, "INVALID_REFERENCE"
    if isinstance(exc, errors.InvalidInput):
        return 400, "INVALID_INPUT"
    if isinstance(exc, errors.NotFound):
        return 404, "NOT_FOUND"
    if isinstance(exc, errors.Conflict):
        return 409, "CONFLICT"
    if isinstance(exc, errors.EngineError):
        return (503, "ENGINE_UNAVAILABLE") if exc.transient else (500, "ENGINE_ERROR")
    return 500, "INTERNAL_ERROR"
