"""HTTP basic auth and the bearer token flow for registry requests.

The token flow follows the distribution "Token Authentication Specification": the registry
responds 401 with `WWW-Authenticate: Bearer realm="...",service="...",scope="..."`, the client
GETs the realm with `service` and one `scope` query parameter per scope (with basic credentials
when it has them) and resends the request with `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable, Generator

import httpx

from sandbox_backup import errors
from sandbox_backup.registry import failures

logger = logging.getLogger(__name__)

DEFAULT_TOKEN_LIFETIME_S = 60.0

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_SEPARATORS_RE = re.compile(r"[\s,]*")
_PARAM_RE = re.compile(rf"({_TOKEN})\s*=\s*({_QUOTED}|{_TOKEN})\s*(?:,|$)")
_SCHEME_RE = re.compile(rf"({_TOKEN})(?:\s+|$)")
_RESOURCE_PATH_RE = re.compile(r"^/v2/(.+?)/(?:manifests|blobs|tags)/")


@dataclasses.dataclass(frozen=True)
class Challenge:
    """One challenge of a `WWW-Authenticate` header: a lowercase scheme and its parameters."""

    scheme: str
    params: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _Token:
    value: str
    expires_at: float


# A cache key of bearer tokens: realm, service and the scope string of the challenge.
_TokenKey = tuple[str, str, str]


def parse_challenges(header_values: list[str]) -> list[Challenge]:
    """Parse `WWW-Authenticate` header values into challenges, in order.

    Parsing of one value stops at the first part that is not an RFC 7235 auth-param, such as
    token68 credentials. The challenges before that part are kept.
    """
    challenges: list[Challenge] = []
    for value in header_values:
        challenges.extend(_parse_challenge_value(value))
    return challenges


def _parse_challenge_value(value: str) -> list[Challenge]:
    challenges: list[Challenge] = []
    position = 0

    while True:
        position = _SEPARATORS_RE.match(value, position).end()
        if position >= len(value):
            return challenges

        param = _PARAM_RE.match(value, position)
        if param and challenges:
            challenges[-1].params[param[1].lower()] = _unquote(param[2])
            position = param.end()
            continue

        scheme = _SCHEME_RE.match(value, position)
        if scheme is None:
            return challenges
        challenges.append(Challenge(scheme[1].lower(), {}))
        position = scheme.end()


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    return text


class RegistryAuth(httpx.Auth):
    """httpx auth for one registry that responds to Basic and Bearer challenges and caches tokens.

    No credentials are sent before the registry first responds 401. After a Basic challenge,
    later requests carry basic credentials from the start. After a Bearer challenge, later
    requests with the same method and repository carry the cached token for the challenge's
    scope until the token expires. When the registry rejects a cached token, a new one is
    fetched once.

    The token endpoint raises RegistryUnavailable for timeouts and 5xx, RegistryAuthError for
    401/403 and RegistryProtocolError for a body without a token.
    """

    # The token response must be read inside the flow. This reads every response of the flow,
    # which is fine for manifests and JSON but would buffer blob downloads.
    requires_response_body = True

    def __init__(
        self,
        username: str | None = None,
        password: str | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if (username is None) != (password is None):
            raise errors.InvalidInput("registry username and password must be given together, or neither")

        self.username = username
        self._basic_header = _basic_header(username, password) if username is not None else None
        self._clock = clock
        self._basic_requested = False
        self._tokens: dict[_TokenKey, _Token] = {}
        self._scope_hints: dict[tuple[str, str], _TokenKey] = {}

    def __repr__(self) -> str:
        return f"RegistryAuth(username={self.username!r})"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        hint_key = _hint_key(request)
        self._apply_known_credentials(request, hint_key)
        sent = request.headers.get("Authorization")

        response = yield request
        if response.status_code != 401:
            return

        challenge = _pick_challenge(response)
        if challenge is None:
            return

        if challenge.scheme == "basic":
            if self._basic_header is None or sent == self._basic_header:
                return
            self._basic_requested = True
            request.headers["Authorization"] = self._basic_header
            yield request
            return

        token_key = _token_key(challenge, response)
        token = self._cached_token(token_key)
        if token is None or sent == f"Bearer {token}":
            token_response = yield self._token_request(request, token_key)
            token = self._store_token(token_key, token_response)

        if hint_key is not None:
            self._scope_hints[hint_key] = token_key
        request.headers["Authorization"] = f"Bearer {token}"
        yield request

    def _apply_known_credentials(self, request: httpx.Request, hint_key: tuple[str, str] | None) -> None:
        if "Authorization" in request.headers:
            return

        token_key = self._scope_hints.get(hint_key) if hint_key is not None else None
        token = self._cached_token(token_key) if token_key is not None else None
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token}"
        elif self._basic_requested and self._basic_header is not None:
            request.headers["Authorization"] = self._basic_header

    def _cached_token(self, token_key: _TokenKey) -> str | None:
        token = self._tokens.get(token_key)
        if token is None or token.expires_at <= self._clock():
            return None
        return token.value

    def _token_request(self, registry_request: httpx.Request, token_key: _TokenKey) -> httpx.Request:
        realm, service, scope = token_key
        params = [("service", service)] if service else []
        params += [("scope", item) for item in scope.split()]

        headers = {}
        if self._basic_header is not None:
            headers["Authorization"] = self._basic_header

        # A request built here has no timeout unless it copies the registry request's, and
        # without one a silent token server would hang the caller forever.
        extensions = {}
        if "timeout" in registry_request.extensions:
            extensions["timeout"] = registry_request.extensions["timeout"]
        return httpx.Request("GET", realm, params=params, headers=headers, extensions=extensions)

    def _store_token(self, token_key: _TokenKey, response: httpx.Response) -> str:
        logger.debug(
            "token request %s returned %s",
            response.request.url,
            response.status_code,
            extra={"action": "registry_token", "url": str(response.request.url), "status": response.status_code},
        )
        if response.status_code != 200:
            raise failures.error_for_status(
                response,
                subject="token endpoint ",
                hint="check the registry's auth.token.realm setting and that the token server is running",
            )

        value, lifetime = _parse_token_body(response)
        self._tokens[token_key] = _Token(value, self._clock() + lifetime)
        return value


def _basic_header(username: str, password: str | None) -> str:
    credentials = f"{username}:{password}".encode()
    return "Basic " + base64.b64encode(credentials).decode("ascii")


def _hint_key(request: httpx.Request) -> tuple[str, str] | None:
    path = request.url.path
    if path == "/v2/":
        return (request.method, "")
    match = _RESOURCE_PATH_RE.match(path)
    return (request.method, match[1]) if match else None


def _pick_challenge(response: httpx.Response) -> Challenge | None:
    challenges = parse_challenges(response.headers.get_list("WWW-Authenticate"))
    by_scheme = {challenge.scheme: challenge for challenge in reversed(challenges)}

    # Bearer tokens are scoped and expire, so prefer them when the registry offers both.
    return by_scheme.get("bearer") or by_scheme.get("basic")


def _token_key(challenge: Challenge, response: httpx.Response) -> _TokenKey:
    realm = challenge.params.get("realm", "")
    try:
        url = httpx.URL(realm)
    except httpx.InvalidURL:
        url = None

    if url is None or url.scheme not in ("http", "https") or not url.host or url.userinfo:
        raise errors.RegistryProtocolError(
            f"{failures.describe(response.request)} returned a Bearer challenge with realm {realm!r}, "
            "which is not an http(s) URL without credentials: fix the registry's auth.token.realm setting",
            url=str(response.request.url),
            status_code=response.status_code,
        )

    return (realm, challenge.params.get("service", ""), challenge.params.get("scope", ""))


def _parse_token_body(response: httpx.Response) -> tuple[str, float]:
    try:
        body = json.loads(response.content)
    except ValueError:
        body = None

    token = None
    if isinstance(body, dict):
        token = body.get("token") or body.get("access_token")

    if not isinstance(token, str) or not token:
        raise errors.RegistryProtocolError(
            f"token endpoint {failures.describe(response.request)} returned 200 without a 'token' or "
            "'access_token' string in a JSON object: check the registry's auth.token.realm setting",
            url=str(response.request.url),
            status_code=response.status_code,
        )

    lifetime = body.get("expires_in")
    if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)) or lifetime <= 0:
        lifetime = DEFAULT_TOKEN_LIFETIME_S
    return token, float(lifetime)
