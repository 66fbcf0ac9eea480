"""Translation of failed registry HTTP exchanges into the errors of `sandbox_backup.errors`.

The rule: only a status that states absence means "not found". Everything else that goes
wrong becomes one of these errors, so a caller never reads "could not tell" as "absent":
- timeouts, connection errors, 5xx and 429 -> RegistryUnavailable (transient);
- 401 and 403 -> RegistryAuthError (transient, because the answer is unknown);
- any other status or a body that breaks the spec -> RegistryProtocolError.
"""

from __future__ import annotations

import json

import httpx

from sandbox_backup import errors

MAX_DETAIL_CHARS = 300


def describe(request: httpx.Request) -> str:
    """Return `METHOD URL` for messages.

    Credentials travel only in headers, which this leaves out, and the client rejects
    registry URLs and token realms that contain a user or password.
    """
    return f"{request.method} {request.url}"


def error_codes(response: httpx.Response) -> list[str]:
    """Return the `errors[].code` values of a distribution error body, or [] if there are none."""
    body = _json_body(response)
    if not isinstance(body, dict) or not isinstance(body.get("errors"), list):
        return []
    return [item["code"] for item in body["errors"] if isinstance(item, dict) and isinstance(item.get("code"), str)]


def error_for_status(
    response: httpx.Response,
    *,
    hint: str | None = None,
    subject: str = "",
) -> errors.RegistryError:
    """Build the error for a response whose status the caller did not expect.

    `hint` replaces the generic "what to do next" part for statuses that are neither auth nor
    server failures, for example the 405 of a registry with deletes disabled. `subject` names
    the endpoint when it is not the registry API itself, such as "token endpoint ".
    """
    request = response.request
    status = response.status_code
    where = f"{subject}{describe(request)} returned {status}{_detail(response)}"
    url = str(request.url)

    if status in (401, 403):
        return errors.RegistryAuthError(f"{where}: {_auth_advice(response)}", url=url, status_code=status)

    if status == 429:
        return errors.RegistryUnavailable(
            f"{where}: the registry is rate limiting this client; try again later",
            url=url,
            status_code=status,
        )

    if status >= 500:
        return errors.RegistryUnavailable(
            f"{where}: the registry failed on its side; try again later and check the registry's logs",
            url=url,
            status_code=status,
        )

    advice = hint or "check that the URL points at an OCI distribution registry (API v2)"
    return errors.RegistryProtocolError(f"{where}: {advice}", url=url, status_code=status)


def error_for_transport(exc: httpx.HTTPError, request: httpx.Request) -> errors.RegistryError:
    """Build the error for an exchange that produced no usable response."""
    where = describe(request)
    url = str(request.url)

    if isinstance(exc, httpx.TimeoutException):
        return errors.RegistryUnavailable(
            f"{where} timed out {_timeout_phase(exc, request)}: check that the registry is running and "
            "reachable, or raise the registry timeout",
            url=url,
        )

    if isinstance(exc, httpx.TransportError):
        return errors.RegistryUnavailable(
            f"{where} failed ({type(exc).__name__}: {exc}): check that the registry is running and reachable",
            url=url,
        )

    return errors.RegistryProtocolError(
        f"{where} failed ({type(exc).__name__}: {exc}): check that the URL points at an OCI distribution registry",
        url=url,
    )


# Maps each httpx timeout to its key in the request's timeout settings and to what was waited for.
_TIMEOUT_PHASES = {
    httpx.ConnectTimeout: ("connect", "connecting"),
    httpx.ReadTimeout: ("read", "waiting for the response"),
    httpx.WriteTimeout: ("write", "sending the request"),
    httpx.PoolTimeout: ("pool", "waiting for a free connection"),
}


def _timeout_phase(exc: httpx.TimeoutException, request: httpx.Request) -> str:
    key, activity = _TIMEOUT_PHASES.get(type(exc), (None, None))
    seconds = request.extensions.get("timeout", {}).get(key)
    if seconds is None:
        return f"({type(exc).__name__})"
    return f"after {seconds} s {activity}"


def _auth_advice(response: httpx.Response) -> str:
    challenge = response.headers.get("WWW-Authenticate")
    sent = response.request.headers.get("Authorization")

    if sent is None and challenge is not None:
        return (
            f"the registry requires authentication (WWW-Authenticate: {challenge}) and no credentials "
            "are configured, or the challenge could not be used; configure a username and password"
        )

    if sent is None:
        return "the registry rejected the request without credentials; configure a username and password"

    return "the registry rejected the credentials; check the username, the password and the user's permissions"


def _detail(response: httpx.Response) -> str:
    body = _json_body(response)
    if not isinstance(body, dict) or not isinstance(body.get("errors"), list):
        return ""

    parts = []
    for item in body["errors"]:
        if isinstance(item, dict):
            parts.append(f"{item.get('code')}: {item.get('message')}")

    text = "; ".join(parts)
    if len(text) > MAX_DETAIL_CHARS:
        text = text[:MAX_DETAIL_CHARS] + "..."
    return f" ({text})" if text else ""


def _json_body(response: httpx.Response) -> object:
    if not response.content:
        return None
    try:
        return json.loads(response.content)
    except ValueError:
        return None
