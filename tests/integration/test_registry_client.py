"""RegistryClient against a real docker-registry (distribution 2.8), plus loopback fakes for faults.

The fakes from tests.fixtures.registry_fakes stand in only where the real registry cannot
produce the case: a 5xx, a hang, a missing Docker-Content-Digest header, a corrupted body,
and Link pagination, which distribution 2.8 does not implement for tag lists.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest

from sandbox_backup import errors
from sandbox_backup.registry import RegistryAuth, RegistryClient, mediatypes
from tests.fixtures.registry_fakes import (
    FakeResponse,
    RecordedRequest,
    Responder,
    fake_registry,
    json_response,
    silent_server,
)
from tests.fixtures.registry_images import (
    push_blob,
    push_manifest,
    push_test_image,
    sha256_digest,
    unique_repository,
)
from tests.fixtures.registry_servers import RegistryServer, basic_auth_registry
from tests.fixtures.registry_tokens import TokenServer

MISSING_DIGEST = "sha256:" + "0" * 64
ALL_MANIFEST_TYPES = [
    mediatypes.OCI_MANIFEST,
    mediatypes.DOCKER_MANIFEST,
    mediatypes.OCI_INDEX,
    mediatypes.DOCKER_MANIFEST_LIST,
]


def client_for(server: RegistryServer, **kwargs: object) -> RegistryClient:
    return RegistryClient(server.url, username=server.username, password=server.password, **kwargs)


# Authentication


async def test_ping_with_basic_auth(registry_server: RegistryServer) -> None:
    async with client_for(registry_server) as client:
        await client.ping()


async def test_ping_without_auth(open_registry_server: RegistryServer) -> None:
    async with RegistryClient(open_registry_server.url) as client:
        await client.ping()


async def test_ping_with_token_challenge(
    token_registry_server: RegistryServer,
    registry_token_server: TokenServer,
) -> None:
    before = len(registry_token_server.requests)

    async with client_for(token_registry_server) as client:
        await client.ping()

    assert len(registry_token_server.requests) == before + 1


async def test_wrong_password_raises_auth_error(registry_server: RegistryServer) -> None:
    wrong_password = "not-the-password-" + registry_server.password[:4]
    repository = unique_repository()

    async with RegistryClient(registry_server.url, username="backup", password=wrong_password) as client:
        with pytest.raises(errors.RegistryAuthError) as ping_error:
            await client.ping()
        with pytest.raises(errors.RegistryAuthError) as head_error:
            await client.head_manifest(repository, "latest")
        with pytest.raises(errors.RegistryAuthError):
            await client.list_tags(repository)
        with pytest.raises(errors.RegistryAuthError):
            await client.blob_exists(repository, MISSING_DIGEST)

    assert ping_error.value.status_code == 401
    assert wrong_password not in str(ping_error.value)
    assert registry_server.password not in str(head_error.value)
    assert wrong_password not in str(head_error.value)
    assert "password" in str(head_error.value)


async def test_missing_credentials_raise_auth_error(registry_server: RegistryServer) -> None:
    async with RegistryClient(registry_server.url) as client:
        with pytest.raises(errors.RegistryAuthError) as caught:
            await client.head_manifest(unique_repository(), "latest")

    assert "no credentials" in str(caught.value)


async def test_token_wrong_password_raises_auth_error(token_registry_server: RegistryServer) -> None:
    async with RegistryClient(token_registry_server.url, username="backup", password="wrong") as client:
        with pytest.raises(errors.RegistryAuthError) as caught:
            await client.head_manifest(unique_repository(), "latest")

    assert "token endpoint" in str(caught.value)
    assert "wrong" not in str(caught.value)


async def test_token_endpoint_5xx_raises_unavailable(
    token_registry_server: RegistryServer,
    registry_token_server: TokenServer,
) -> None:
    registry_token_server.fail_status = 503
    try:
        async with client_for(token_registry_server) as client:
            with pytest.raises(errors.RegistryUnavailable) as caught:
                await client.head_manifest(unique_repository(), "latest")
    finally:
        registry_token_server.fail_status = None

    assert caught.value.status_code == 503
    assert registry_token_server.realm in str(caught.value)


async def test_token_endpoint_timeout_raises_unavailable() -> None:
    # Fake registry: the real one takes its token realm from its config file, and the realm here
    # must be a socket that never responds.
    with silent_server() as token_url:
        challenge = f'Bearer realm="{token_url}/token",service="fake",scope="repository:some/repository:pull"'

        def respond(request: RecordedRequest) -> FakeResponse:
            return json_response(401, b'{"errors": []}', {"WWW-Authenticate": challenge})

        with fake_registry(respond) as fake:
            async with RegistryClient(fake.url, username="backup", password="secret", timeout_s=0.2) as client:
                with pytest.raises(errors.RegistryUnavailable) as caught:
                    await client.head_manifest("some/repository", "v1")

    assert isinstance(caught.value.__cause__, httpx.TimeoutException)
    assert f"{token_url}/token" in str(caught.value)
    assert "secret" not in str(caught.value)


async def test_token_cached_per_scope(
    token_registry_server: RegistryServer,
    registry_token_server: TokenServer,
) -> None:
    repository = unique_repository()
    digest = push_test_image(token_registry_server, repository, "v1")
    before = len(registry_token_server.requests)

    async with client_for(token_registry_server) as client:
        for _ in range(3):
            info = await client.head_manifest(repository, "v1")
            assert info is not None
            assert info.digest == digest

    new_requests = registry_token_server.requests[before:]
    assert [request.get("scope") for request in new_requests] == [[f"repository:{repository}:pull"]]


async def test_token_fetched_again_after_expiry(
    token_registry_server: RegistryServer,
    registry_token_server: TokenServer,
) -> None:
    now = [1000.0]
    auth = RegistryAuth(token_registry_server.username, token_registry_server.password, clock=lambda: now[0])
    url = f"{token_registry_server.url}/v2/"
    before = len(registry_token_server.requests)

    async with httpx.AsyncClient(auth=auth, trust_env=False) as http:
        assert (await http.get(url)).status_code == 200
        assert (await http.get(url)).status_code == 200
        now[0] += registry_token_server.lifetime_s + 1
        assert (await http.get(url)).status_code == 200

    assert len(registry_token_server.requests) == before + 2


# Manifests


@pytest.mark.parametrize("media_type", ALL_MANIFEST_TYPES)
async def test_head_returns_pushed_digest(registry_server: RegistryServer, media_type: str) -> None:
    repository = unique_repository()
    digest = push_test_image(registry_server, repository, "v1", media_type=media_type, layers=[b"one", b"two"])

    async with client_for(registry_server) as client:
        by_tag = await client.head_manifest(repository, "v1")
        by_digest = await client.head_manifest(repository, digest)
        manifest = await client.get_manifest(repository, "v1")

    assert by_tag is not None
    assert by_tag.digest == digest
    assert by_tag.media_type == media_type
    assert by_digest == by_tag
    assert manifest is not None
    assert manifest.digest == digest
    assert by_tag.size == manifest.size


@pytest.mark.parametrize("media_type", [mediatypes.OCI_MANIFEST, mediatypes.DOCKER_MANIFEST])
async def test_get_manifest_lists_layers(registry_server: RegistryServer, media_type: str) -> None:
    repository = unique_repository()
    layers = [b"first layer", b"second layer"]
    digest = push_test_image(registry_server, repository, "v1", media_type=media_type, layers=layers)

    async with client_for(registry_server) as client:
        manifest = await client.get_manifest(repository, digest)
        assert manifest is not None
        config_exists = await client.blob_exists(repository, manifest.config_digest)

    assert manifest.media_type == media_type
    assert not manifest.is_index
    assert manifest.layer_digests == tuple(sha256_digest(layer) for layer in layers)
    assert manifest.content["mediaType"] == media_type
    assert sha256_digest(manifest.raw) == digest
    assert config_exists


async def test_get_manifest_of_index_lists_children(registry_server: RegistryServer) -> None:
    repository = unique_repository()
    digest = push_test_image(registry_server, repository, "v1", media_type=mediatypes.OCI_INDEX)

    async with client_for(registry_server) as client:
        index = await client.get_manifest(repository, "v1")
        assert index is not None
        child = await client.get_manifest(repository, index.child_digests[0])

    assert index.digest == digest
    assert index.is_index
    assert len(index.child_digests) == 1
    assert child is not None
    assert child.media_type == mediatypes.OCI_MANIFEST


async def test_head_unknown_tag_returns_none(registry_server: RegistryServer) -> None:
    repository = unique_repository()
    push_test_image(registry_server, repository, "v1")

    async with client_for(registry_server) as client:
        assert await client.head_manifest(repository, "v2") is None
        assert await client.head_manifest(repository, MISSING_DIGEST) is None
        assert await client.get_manifest(repository, "v2") is None


async def test_head_unknown_repository_returns_none(registry_server: RegistryServer) -> None:
    repository = unique_repository()

    async with client_for(registry_server) as client:
        assert await client.head_manifest(repository, "latest") is None
        assert await client.get_manifest(repository, "latest") is None
        assert await client.get_manifest(repository, MISSING_DIGEST) is None


async def test_head_without_digest_header_falls_back_to_get() -> None:
    # Fake: the real registry always sends Docker-Content-Digest on HEAD.
    body = json.dumps({"schemaVersion": 2, "mediaType": mediatypes.OCI_INDEX, "manifests": []}).encode()

    def respond(request: RecordedRequest) -> FakeResponse:
        if request.method == "HEAD":
            return FakeResponse(200, {"Content-Type": mediatypes.OCI_INDEX, "Content-Length": str(len(body))})
        return FakeResponse(200, {"Content-Type": mediatypes.OCI_INDEX}, body)

    with fake_registry(respond) as fake:
        async with RegistryClient(fake.url) as client:
            info = await client.head_manifest("some/repository", "v1")

    assert info is not None
    assert info.digest == sha256_digest(body)
    assert info.media_type == mediatypes.OCI_INDEX
    assert info.size == len(body)
    assert [request.method for request in fake.requests] == ["HEAD", "GET"]
    assert all(mediatypes.DOCKER_MANIFEST_LIST in request.headers["Accept"] for request in fake.requests)


async def test_get_manifest_rejects_body_mismatch() -> None:
    # Fake: a real registry does not serve a body that differs from the digest it was asked for.
    body = json.dumps({"schemaVersion": 2, "mediaType": mediatypes.OCI_INDEX, "manifests": []}).encode()

    def respond(request: RecordedRequest) -> FakeResponse:
        return FakeResponse(200, {"Content-Type": mediatypes.OCI_INDEX}, body)

    with fake_registry(respond) as fake:
        async with RegistryClient(fake.url) as client:
            with pytest.raises(errors.RegistryProtocolError) as caught:
                await client.get_manifest("some/repository", MISSING_DIGEST)

    assert MISSING_DIGEST in str(caught.value)


async def test_unrelated_404_is_not_absence() -> None:
    # Fake: for example a proxy that returns its own 404 errors; the client must not read them as "absent".
    body = json.dumps({"errors": [{"code": "UNSUPPORTED", "message": "no such route"}]}).encode()

    with fake_registry(lambda request: json_response(404, body)) as fake:
        async with RegistryClient(fake.url) as client:
            with pytest.raises(errors.RegistryProtocolError):
                await client.get_manifest("some/repository", "v1")
            with pytest.raises(errors.RegistryProtocolError):
                await client.list_tags("some/repository")
            with pytest.raises(errors.RegistryProtocolError):
                await client.delete_manifest("some/repository", MISSING_DIGEST)


# Outages and server faults


async def test_registry_stopped_raises_unavailable(registry_server: RegistryServer) -> None:
    repository = unique_repository()
    digest = push_test_image(registry_server, repository, "v1")

    registry_server.stop()
    try:
        async with client_for(registry_server, timeout_s=2.0) as client:
            with pytest.raises(errors.RegistryUnavailable):
                await client.ping()
            with pytest.raises(errors.RegistryUnavailable) as caught:
                await client.head_manifest(repository, "v1")
            with pytest.raises(errors.RegistryUnavailable):
                await client.list_tags(repository)
            with pytest.raises(errors.RegistryUnavailable):
                await client.blob_exists(repository, MISSING_DIGEST)
            with pytest.raises(errors.RegistryUnavailable):
                await client.delete_manifest(repository, digest)
    finally:
        registry_server.start()

    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert caught.value.transient

    async with client_for(registry_server) as client:
        info = await client.head_manifest(repository, "v1")
    assert info is not None
    assert info.digest == digest


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_error_raises_unavailable(status: int) -> None:
    # Fake: a real registry cannot be made to fail with a 5xx on demand.
    body = json.dumps({"errors": [{"code": "UNKNOWN", "message": "storage backend failed"}]}).encode()

    with fake_registry(lambda request: json_response(status, body)) as fake:
        async with RegistryClient(fake.url) as client:
            with pytest.raises(errors.RegistryUnavailable) as caught:
                await client.head_manifest("some/repository", "v1")
            with pytest.raises(errors.RegistryUnavailable):
                await client.get_manifest("some/repository", "v1")
            with pytest.raises(errors.RegistryUnavailable):
                await client.list_tags("some/repository")
            with pytest.raises(errors.RegistryUnavailable):
                await client.blob_exists("some/repository", MISSING_DIGEST)
            with pytest.raises(errors.RegistryUnavailable):
                await client.delete_manifest("some/repository", MISSING_DIGEST)
            with pytest.raises(errors.RegistryUnavailable):
                await client.ping()

    assert caught.value.status_code == status
    assert "/v2/some/repository/manifests/v1" in str(caught.value)


async def test_timeout_raises_unavailable() -> None:
    # Fake: a socket that never responds, because a real registry responds at once.
    with silent_server() as url:
        async with RegistryClient(url, timeout_s=0.2) as client:
            started = time.monotonic()
            with pytest.raises(errors.RegistryUnavailable) as caught:
                await client.head_manifest("some/repository", "v1")
            elapsed = time.monotonic() - started

    assert isinstance(caught.value.__cause__, httpx.TimeoutException)
    assert "timed out" in str(caught.value)
    assert elapsed < 2.0


# Tags


async def test_list_tags_returns_every_tag(registry_server: RegistryServer) -> None:
    repository = unique_repository()
    push_test_image(registry_server, repository, "t00")
    async with client_for(registry_server) as client:
        manifest = await client.get_manifest(repository, "t00")
    assert manifest is not None

    expected = [f"t{number:02d}" for number in range(25)]
    for tag in expected[1:]:
        push_manifest(registry_server, repository, tag, manifest.content)

    async with client_for(registry_server) as client:
        tags = await client.list_tags(repository, page_size=4)

    # distribution 2.8 ignores `n` and sends every tag in one unsorted page.
    assert len(tags) == 25
    assert sorted(tags) == expected


async def test_list_tags_unknown_repository_returns_empty(registry_server: RegistryServer) -> None:
    async with client_for(registry_server) as client:
        assert await client.list_tags(unique_repository()) == []


def paginating_responder(all_tags: list[str]) -> Responder:
    """Return a responder that pages `all_tags` by `n` and `last` like the distribution spec."""

    def respond(request: RecordedRequest) -> FakeResponse:
        url = urllib.parse.urlsplit(request.path)
        query = urllib.parse.parse_qs(url.query)
        size = int(query["n"][0])
        last = query.get("last", [""])[0]

        remaining = [tag for tag in all_tags if tag > last]
        page = remaining[:size]
        headers = {}
        if len(remaining) > size:
            next_query = urllib.parse.urlencode({"n": size, "last": page[-1]})
            headers["Link"] = f'<{url.path}?{next_query}>; rel="next"'
        return json_response(200, json.dumps({"name": "some/repository", "tags": page}).encode(), headers)

    return respond


async def test_list_tags_follows_link_pages() -> None:
    # Fake: distribution 2.8 does not paginate tag lists, so a real registry cannot test this.
    expected = [f"t{number:02d}" for number in range(25)]

    with fake_registry(paginating_responder(expected)) as fake:
        async with RegistryClient(fake.url) as client:
            tags = await client.list_tags("some/repository", page_size=4)

    assert tags == expected
    assert len(fake.requests) == 7
    assert all("n=4" in request.path for request in fake.requests)


@pytest.mark.parametrize(
    "link",
    [
        "garbage",
        "</v2/some/repository/tags/list?n=1&last=a; rel=next",
        '</v2/some/repository/tags/list?n=1&last=a>; rel="next" trailing',
    ],
)
async def test_list_tags_rejects_malformed_link(link: str) -> None:
    # Fake: a real registry never sends a malformed Link header.
    def respond(request: RecordedRequest) -> FakeResponse:
        return json_response(200, json.dumps({"name": "some/repository", "tags": ["a"]}).encode(), {"Link": link})

    with fake_registry(respond) as fake:
        async with RegistryClient(fake.url) as client:
            with pytest.raises(errors.RegistryProtocolError) as caught:
                await client.list_tags("some/repository", page_size=1)

    assert "Link" in str(caught.value)


async def test_list_tags_rejects_repeated_link() -> None:
    # Fake: a registry that keeps pointing at the same page would otherwise loop forever.
    def respond(request: RecordedRequest) -> FakeResponse:
        link = '</v2/some/repository/tags/list?n=1&last=a>; rel="next"'
        return json_response(200, json.dumps({"name": "some/repository", "tags": ["a"]}).encode(), {"Link": link})

    with fake_registry(respond) as fake:
        async with RegistryClient(fake.url) as client:
            with pytest.raises(errors.RegistryProtocolError):
                await client.list_tags("some/repository", page_size=1)

    assert len(fake.requests) == 2


async def test_list_tags_rejects_foreign_link() -> None:
    # Fake: the client must not follow (and send credentials to) a next page on another host.
    def respond(request: RecordedRequest) -> FakeResponse:
        link = '<http://127.0.0.2:1/v2/some/repository/tags/list?n=1&last=a>; rel="next"'
        return json_response(200, json.dumps({"name": "some/repository", "tags": ["a"]}).encode(), {"Link": link})

    with fake_registry(respond) as fake:
        async with RegistryClient(fake.url) as client:
            with pytest.raises(errors.RegistryProtocolError) as caught:
                await client.list_tags("some/repository", page_size=1)

    assert "another host" in str(caught.value)
    assert len(fake.requests) == 1


# Deletes and blobs


async def test_delete_by_digest_then_head_returns_none(registry_server: RegistryServer) -> None:
    repository = unique_repository()
    layer = b"layer that only this test pushes " + repository.encode()
    digest = push_test_image(registry_server, repository, "v1", layers=[layer])

    async with client_for(registry_server) as client:
        assert await client.delete_manifest(repository, digest) is True
        assert await client.head_manifest(repository, digest) is None
        assert await client.head_manifest(repository, "v1") is None
        assert await client.delete_manifest(repository, digest) is False
        assert await client.list_tags(repository) == []
        blob_kept = await client.blob_exists(repository, sha256_digest(layer))

    registry_server.garbage_collect()

    async with client_for(registry_server) as client:
        blob_after_gc = await client.blob_exists(repository, sha256_digest(layer))

    assert blob_kept
    assert not blob_after_gc


async def test_delete_disabled_raises_protocol_error(tmp_path: Path) -> None:
    server = basic_auth_registry(tmp_path, delete_enabled=False)
    server.start()
    try:
        repository = unique_repository()
        digest = push_test_image(server, repository, "v1")
        async with client_for(server) as client:
            with pytest.raises(errors.RegistryProtocolError) as caught:
                await client.delete_manifest(repository, digest)
            still_there = await client.head_manifest(repository, digest)
    finally:
        server.stop()

    assert caught.value.status_code == 405
    assert "storage.delete.enabled" in str(caught.value)
    assert still_there is not None


async def test_delete_by_tag_raises_invalid_reference(registry_server: RegistryServer) -> None:
    async with client_for(registry_server) as client:
        with pytest.raises(errors.InvalidReference):
            await client.delete_manifest(unique_repository(), "v1")


async def test_blob_exists_true_and_false(registry_server: RegistryServer) -> None:
    repository = unique_repository()
    digest = push_blob(registry_server, repository, b"a blob for blob_exists")

    async with client_for(registry_server) as client:
        assert await client.blob_exists(repository, digest) is True
        assert await client.blob_exists(repository, MISSING_DIGEST) is False
        assert await client.blob_exists(unique_repository(), digest) is False


# Input validation


@pytest.mark.parametrize(
    ("repository", "reference"),
    [
        ("UPPER/case", "v1"),
        ("a//b", "v1"),
        ("-leading/dash", "v1"),
        ("../escape", "v1"),
        ("trailing/newline\n", "v1"),
        ("", "v1"),
        ("x" * 256, "v1"),
        ("good/name", "bad tag"),
        ("good/name", "../v1"),
        ("good/name", "v1\n"),
        ("good/name", "sha256:"),
        ("good/name", "x" * 129),
    ],
)
async def test_bad_reference_raises_before_any_request(
    registry_server: RegistryServer,
    repository: str,
    reference: str,
) -> None:
    sent: list[httpx.Request] = []

    async def record(request: httpx.Request) -> None:
        sent.append(request)

    async with httpx.AsyncClient(event_hooks={"request": [record]}, trust_env=False) as http:
        client = client_for(registry_server, http=http)
        with pytest.raises(errors.InvalidReference):
            await client.head_manifest(repository, reference)
        with pytest.raises(errors.InvalidReference):
            await client.get_manifest(repository, reference)
        with pytest.raises(errors.InvalidReference):
            await client.blob_exists(repository, reference)
        with pytest.raises(errors.InvalidReference):
            await client.delete_manifest(repository, reference)
        if repository != "good/name":
            with pytest.raises(errors.InvalidReference):
                await client.list_tags(repository)

    assert sent == []


async def test_given_http_client_stays_open(registry_server: RegistryServer) -> None:
    async with httpx.AsyncClient(trust_env=False) as http:
        async with client_for(registry_server, http=http) as client:
            await client.ping()
        assert not http.is_closed
