"""Bearer-token check for the runner API."""

from __future__ import annotations

import hmac

import fastapi

from sandbox_backup.runner.context import runner_context
from sandbox_backup.runner.http_errors import ApiError


async def require_token(request: fastapi.Request) -> None:
    """Raise a 401 ApiError unless the request carries `Authorization: Bearer <runner token>`."""
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise ApiError(401, "missing bearer token: send 'Authorization: Bearer <runner token>'", code="UNAUTHORIZED")

    # compare_digest takes the same time wherever the first differing byte is.
    expected = runner_context(request).settings.token.get_secret_value()
    if not hmac.compare_digest(presented.strip().encode(), expected.encode()):
        raise ApiError(401, "invalid bearer token: use the token this runner was started with", code="UNAUTHORIZED")
