"""Look-up of a pushed manifest's digest with a HEAD request to the registry.

The push stream of Docker and of Podman 4.3 carries the digest, so this runs only when an
engine leaves it out. The registry picks the manifest format from the Accept header, and
the digest depends on that format, so the request accepts all four manifest media types
that an engine may have pushed.
"""

from __future__ import annotations

import logging
import re
import urllib.parse

import httpx

from sandbox_backup.domain.reference import parse_reference, registry_host
from sandbox_backup.runner.models import RegistryCredentials

logger = logging.getLogger(__name__)

MANIFEST_MEDIA_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)

_CHALLENGE_PARAM_RE = re.compile(r'(\w+)="([^"]*)"')


async def resolve_manifest_digest(
    reference: str, registry: RegistryCredentials, *, timeout_s: float = 30.0
) -> str | None:
    """Return the `sha256:...` digest of the manifest that `reference` names, or None.

    None also stands for a failed look-up, which is logged: a missing digest leaves the
    backup usable by tag.
    """
    parsed = parse_reference(reference)
    scheme = urllib.parse.urlsplit(registry.url).scheme or "https"
    url = f"{scheme}://{registry_host(registry.url)}/v2/{parsed.repository}/manifests/{parsed.digest or parsed.tag}"
    headers = {"Accept": ", ".join(MANIFEST_MEDIA_TYPES)}

    try:
        async with httpx.AsyncClient(timeout=timeout_s) as http:
            response = await http.head(url, headers=headers)
            if response.status_code == 401:
                response = await _retry_with_credentials(http, url, headers, response, registry, parsed.repository)
    except httpx.HTTPError as exc:
        logger.warning(
            "digest look-up of %s failed: %s",
            reference,
            exc,
            extra={"action": "resolve_digest", "reference": reference},
        )
        return None

    digest = response.headers.get("Docker-Content-Digest")
    if response.status_code != 200 or not digest:
        logger.warning(
            "digest look-up of %s failed: the registry answered %s without a Docker-Content-Digest header",
            reference,
            response.status_code,
            extra={"action": "resolve_digest", "reference": reference, "status_code": response.status_code},
        )
        return None
    return digest


async def _retry_with_credentials(
    http: httpx.AsyncClient,
    url: str,
    headers: dict[str, str],
    challenge_response: httpx.Response,
    registry: RegistryCredentials,
    repository: str,
) -> httpx.Response:
    """Repeat the HEAD with the credentials that the registry's WWW-Authenticate challenge asks for."""
    if not registry.username:
        return challenge_response
    password = registry.password.get_secret_value() if registry.password else ""
    challenge = challenge_response.headers.get("WWW-Authenticate", "")

    if challenge.lower().startswith("bearer"):
        token = await _fetch_bearer_token(http, challenge, registry.username, password, repository)
        if token is None:
            return challenge_response
        return await http.head(url, headers={**headers, "Authorization": f"Bearer {token}"})
    return await http.head(url, headers=headers, auth=(registry.username, password))


async def _fetch_bearer_token(
    http: httpx.AsyncClient, challenge: str, username: str, password: str, repository: str
) -> str | None:
    # Token flow of the distribution spec: GET the realm with service and scope, using basic auth.
    params = dict(_CHALLENGE_PARAM_RE.findall(challenge))
    realm = params.pop("realm", None)
    if not realm:
        return None
    params.setdefault("scope", f"repository:{repository}:pull")
    response = await http.get(realm, params=params, auth=(username, password))
    if response.status_code != 200:
        return None
    body = response.json()
    return body.get("token") or body.get("access_token")
