"""Async client for the OCI distribution API (v2) of one registry.

Every method keeps "not found" apart from "could not tell": only a 404 (or the spec's
MANIFEST_UNKNOWN / NAME_UNKNOWN codes) means absent. Timeouts, connection errors, 429 and
5xx raise RegistryUnavailable, 401/403 raise RegistryAuthError, and anything else that breaks
the spec raises RegistryProtocolError, chained to the httpx exception where there is one.
"""

from __future__ import annotations

import json
import logging
from types import TracebackType
from typing import Any

import httpx

from sandbox_backup import errors
from sandbox_backup.domain.reference import DIGEST_RE, MAX_REPOSITORY_LENGTH, REPOSITORY_RE, TAG_RE
from sandbox_backup.registry import failures, links, manifests, mediatypes
from sandbox_backup.registry.auth import RegistryAuth
from sandbox_backup.registry.manifests import Manifest, ManifestInfo

logger = logging.getLogger(__name__)

# Error codes of the distribution spec that mean "this does not exist".
UNKNOWN_CODES = frozenset({"MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"})
# Content types that do not identify the manifest type, so the body's mediaType field decides.
_GENERIC_CONTENT_TYPES = frozenset({"", "application/json", "application/octet-stream", "text/plain"})


class RegistryClient:
    """Client for one registry URL such as `http://127.0.0.1:5000`; the scheme picks http or https.

    `timeout_s` applies to each phase (connect, read, write, pool) of every request. Pass `http`
    to share a connection pool or to set proxies and TLS options; the client does not close an
    `http` it was given. The default client ignores proxy environment variables.
    """

    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        timeout_s: float = 10.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise errors.InvalidInput(f"registry timeout {timeout_s!r} s is invalid: use a positive number")

        self.url = _normalize_base_url(url)
        self._auth = RegistryAuth(username, password)
        self._timeout = httpx.Timeout(timeout_s)
        self._owns_http = http is None
        self._http = http if http is not None else httpx.AsyncClient(trust_env=False)

    def __repr__(self) -> str:
        return f"RegistryClient({self.url!r}, username={self._auth.username!r})"

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool, unless it was passed in as `http`."""
        if self._owns_http:
            await self._http.aclose()

    async def ping(self) -> None:
        """Check that `GET /v2/` returns 200, authenticating when the registry responds 401."""
        response = await self._request("GET", "/v2/")
        if response.status_code != 200:
            raise failures.error_for_status(response)

    async def head_manifest(self, repository: str, reference: str) -> ManifestInfo | None:
        """Return the digest, media type and size of a manifest by tag or digest, or None if absent.

        When the HEAD response lacks Docker-Content-Digest, Content-Type or Content-Length, the
        manifest is fetched with GET and its digest computed from the body.
        """
        path = _manifest_path(repository, reference)
        response = await self._request("HEAD", path, headers={"Accept": mediatypes.MANIFEST_ACCEPT})
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise failures.error_for_status(response)

        info = _info_from_headers(response)
        if info is None:
            manifest = await self.get_manifest(repository, reference)
            return manifest.info if manifest is not None else None

        _check_digest_matches_reference(response, info.digest, reference)
        return info

    async def get_manifest(self, repository: str, reference: str) -> Manifest | None:
        """Fetch a manifest by tag or digest and verify its digest; return None if absent."""
        path = _manifest_path(repository, reference)
        response = await self._request("GET", path, headers={"Accept": mediatypes.MANIFEST_ACCEPT})
        if _is_not_found(response):
            return None
        if response.status_code != 200:
            raise failures.error_for_status(response)

        content = _parse_json_object(response)
        media_type = _manifest_media_type(response, content)
        _check_structure(response, media_type, content)

        digest = _verified_digest(response, reference)
        return Manifest(digest=digest, media_type=media_type, content=content, raw=response.content)

    async def blob_exists(self, repository: str, digest: str) -> bool:
        """Return whether the repository has the blob; redirects to blob storage are followed."""
        _validate_repository(repository)
        _validate_digest(digest)

        response = await self._request("HEAD", f"/v2/{repository}/blobs/{digest}", follow_redirects=True)
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise failures.error_for_status(response)
        return True

    async def list_tags(self, repository: str, *, page_size: int = 1000) -> list[str]:
        """Return every tag of the repository, following `Link: rel="next"` pages to the end.

        An unknown repository returns []. If any page fails, the method raises and returns no
        partial list. Tags come in the registry's order: distribution 2.8 sends them unsorted.
        """
        _validate_repository(repository)
        if page_size < 1:
            raise errors.InvalidInput(f"tag page size {page_size!r} is invalid: use a positive integer")

        url = self._url(f"/v2/{repository}/tags/list").copy_merge_params({"n": str(page_size)})
        tags: list[str] = []
        seen_urls = {str(url)}
        page_number = 0

        while True:
            page_number += 1
            response = await self._request("GET", url)
            if _is_not_found(response) and page_number == 1:
                return []
            if _is_not_found(response):
                raise errors.RegistryUnavailable(
                    f"{failures.describe(response.request)} returned 404 for page {page_number} after "
                    f"{len(tags)} tags: the repository was deleted during the listing; list its tags again",
                    url=str(response.request.url),
                    status_code=404,
                )
            if response.status_code != 200:
                raise failures.error_for_status(response)

            tags.extend(_tags_from_page(response, repository))

            url = self._next_page_url(response, seen_urls)
            if url is None:
                return tags

    async def delete_manifest(self, repository: str, digest: str) -> bool:
        """Delete a manifest by digest; return True if deleted and False if it was already gone.

        distribution 2.8 also removes the tags that point at the manifest. It keeps the blobs
        until its garbage collection runs.
        """
        _validate_repository(repository)
        _validate_digest(digest, purpose="delete a manifest; resolve the tag with head_manifest first")

        response = await self._request("DELETE", f"/v2/{repository}/manifests/{digest}")
        if response.status_code in (200, 202, 204):
            return True
        if _is_not_found(response):
            return False
        if response.status_code == 405:
            raise failures.error_for_status(
                response,
                hint="the registry has deletes disabled; set storage.delete.enabled: true in its config",
            )
        raise failures.error_for_status(response)

    async def _request(
        self,
        method: str,
        url: str | httpx.URL,
        *,
        headers: dict[str, str] | None = None,
        follow_redirects: bool = False,
    ) -> httpx.Response:
        request = self._http.build_request(method, self._url(url), headers=headers, timeout=self._timeout)
        try:
            response = await self._http.send(request, auth=self._auth, follow_redirects=follow_redirects)
        except httpx.HTTPError as exc:
            _log_request(request, None, type(exc).__name__)
            raise failures.error_for_transport(exc, _failed_request(exc, request)) from exc
        except errors.RegistryError as exc:
            _log_request(request, None, type(exc).__name__)
            raise

        _log_request(request, response.status_code, None)
        return response

    def _url(self, url: str | httpx.URL) -> httpx.URL:
        if isinstance(url, httpx.URL):
            return url
        return httpx.URL(self.url + url)

    def _next_page_url(self, response: httpx.Response, seen_urls: set[str]) -> httpx.URL | None:
        try:
            target = links.find_next_link(response.headers.get_list("Link"))
        except links.MalformedLinkHeader as exc:
            raise _protocol_error(response, f"an invalid Link header ({exc})") from exc

        if target is None:
            return None

        next_url = response.request.url.join(target)
        if (next_url.scheme, next_url.netloc) != (response.request.url.scheme, response.request.url.netloc):
            raise _protocol_error(response, f"a next page link to another host, {target!r}")
        if str(next_url) in seen_urls:
            raise _protocol_error(response, f"a next page link {target!r} that was already listed")

        seen_urls.add(str(next_url))
        return next_url


def _failed_request(exc: httpx.HTTPError, fallback: httpx.Request) -> httpx.Request:
    """Return the request that failed, which is the token request when the token endpoint failed."""
    try:
        return exc.request
    except RuntimeError:
        return fallback


def _normalize_base_url(url: str) -> str:
    try:
        parsed = httpx.URL(url.strip())
    except (httpx.InvalidURL, TypeError) as exc:
        raise errors.InvalidInput(
            f"registry url {url!r} is invalid: use a scheme and host, like http://127.0.0.1:5000"
        ) from exc

    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise errors.InvalidInput(
            f"registry url {url!r} needs http:// or https:// and a host, like http://127.0.0.1:5000"
        )
    if parsed.userinfo:
        raise errors.InvalidInput("registry url must not contain credentials: pass username and password instead")
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        raise errors.InvalidInput(
            f"registry url {url!r} has a path, query or fragment: the v2 API lives at the root, "
            "so use only the scheme, host and port"
        )

    return f"{parsed.scheme}://{parsed.netloc.decode('ascii')}"


def _validate_repository(repository: str) -> None:
    if not isinstance(repository, str) or not REPOSITORY_RE.fullmatch(repository):
        raise errors.InvalidReference(
            f"repository {repository!r} is invalid: use lowercase path components of letters and digits "
            "separated by '.', '_', '__' or '-', joined by '/'"
        )
    if len(repository) > MAX_REPOSITORY_LENGTH:
        raise errors.InvalidReference(
            f"repository {repository[:40]!r}... is {len(repository)} characters long: "
            f"the maximum is {MAX_REPOSITORY_LENGTH}"
        )


def _validate_digest(digest: str, *, purpose: str = "name a blob") -> None:
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise errors.InvalidReference(f"digest {digest!r} is invalid: use algorithm:hex, like sha256:..., to {purpose}")


def _manifest_path(repository: str, reference: str) -> str:
    _validate_repository(repository)
    is_tag = isinstance(reference, str) and TAG_RE.fullmatch(reference)
    is_digest = isinstance(reference, str) and DIGEST_RE.fullmatch(reference)
    if not (is_tag or is_digest):
        raise errors.InvalidReference(
            f"manifest reference {reference!r} is neither a tag ([A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}) "
            "nor a digest (algorithm:hex)"
        )
    return f"/v2/{repository}/manifests/{reference}"


def _is_digest(reference: str) -> bool:
    return bool(DIGEST_RE.fullmatch(reference))


def _is_not_found(response: httpx.Response) -> bool:
    """Return True for a 404 unless its body names an error code that does not mean absence."""
    if response.status_code != 404:
        return False
    codes = failures.error_codes(response)
    return not codes or any(code in UNKNOWN_CODES for code in codes)


def _media_type(response: httpx.Response) -> str:
    return response.headers.get("Content-Type", "").split(";")[0].strip()


def _info_from_headers(response: httpx.Response) -> ManifestInfo | None:
    digest = response.headers.get("Docker-Content-Digest")
    media_type = _media_type(response)
    length = response.headers.get("Content-Length", "")
    if not digest or media_type in _GENERIC_CONTENT_TYPES or not length.isdigit():
        return None

    if not DIGEST_RE.fullmatch(digest):
        raise _protocol_error(response, f"an invalid Docker-Content-Digest header {digest!r}")
    return ManifestInfo(digest=digest, media_type=media_type, size=int(length))


def _check_digest_matches_reference(response: httpx.Response, digest: str, reference: str) -> None:
    if _is_digest(reference) and digest != reference:
        raise _protocol_error(response, f"Docker-Content-Digest {digest!r} for a request by digest {reference!r}")


def _parse_json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        content = json.loads(response.content)
    except ValueError as exc:
        raise _protocol_error(response, "a manifest body that is not valid JSON") from exc

    if not isinstance(content, dict):
        raise _protocol_error(response, "a manifest body that is not a JSON object")
    return content


def _manifest_media_type(response: httpx.Response, content: dict[str, Any]) -> str:
    header_type = _media_type(response)
    if header_type not in _GENERIC_CONTENT_TYPES:
        return header_type

    body_type = content.get("mediaType")
    if isinstance(body_type, str) and body_type:
        return body_type
    raise _protocol_error(response, "a manifest without a media type in Content-Type or in its mediaType field")


def _check_structure(response: httpx.Response, media_type: str, content: dict[str, Any]) -> None:
    problem = manifests.find_structure_problem(media_type, content)
    if problem is not None:
        raise _protocol_error(response, f"a {media_type} manifest where {problem}")


def _verified_digest(response: httpx.Response, reference: str) -> str:
    """Return the manifest digest after checking the body against the reference and the header."""
    header_digest = response.headers.get("Docker-Content-Digest")
    if header_digest and not DIGEST_RE.fullmatch(header_digest):
        raise _protocol_error(response, f"an invalid Docker-Content-Digest header {header_digest!r}")

    expected = reference if _is_digest(reference) else header_digest
    if not expected:
        return manifests.compute_digest(response.content)

    algorithm = manifests.digest_algorithm(expected)
    if not manifests.is_supported_algorithm(algorithm):
        raise errors.InvalidReference(
            f"digest {expected!r} uses algorithm {algorithm!r}, which this client cannot verify: use sha256 or sha512"
        )

    actual = manifests.compute_digest(response.content, algorithm)
    if actual != expected:
        raise _protocol_error(response, f"a manifest body with digest {actual}, but {expected} was expected")
    if header_digest and header_digest != expected:
        raise _protocol_error(response, f"Docker-Content-Digest {header_digest!r} for a request by digest {expected!r}")
    return expected


def _tags_from_page(response: httpx.Response, repository: str) -> list[str]:
    try:
        body = json.loads(response.content)
    except ValueError as exc:
        raise _protocol_error(response, "a tag list that is not valid JSON") from exc

    if not isinstance(body, dict):
        raise _protocol_error(response, "a tag list that is not a JSON object")

    name = body.get("name")
    if name is not None and name != repository:
        raise _protocol_error(response, f"the tags of repository {name!r}")

    # distribution 2.8 returns 200 with "tags": null for a repository whose tags were all deleted.
    tags = body.get("tags")
    if tags is None:
        return []
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise _protocol_error(response, "a 'tags' field that is not a list of strings")
    return tags


def _protocol_error(response: httpx.Response, description: str) -> errors.RegistryProtocolError:
    return errors.RegistryProtocolError(
        f"{failures.describe(response.request)} returned {response.status_code} with {description}: "
        "the registry does not follow the distribution spec; check its version and any proxy in front of it",
        url=str(response.request.url),
        status_code=response.status_code,
    )


def _log_request(request: httpx.Request, status: int | None, failure: str | None) -> None:
    logger.debug(
        "%s %s -> %s",
        request.method,
        request.url,
        status if status is not None else failure,
        extra={
            "action": "registry_request",
            "method": request.method,
            "url": str(request.url),
            "status": status,
            "failure": failure,
        },
    )
