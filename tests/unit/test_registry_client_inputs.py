"""RegistryClient checks of its constructor arguments, and manifest helpers; no network."""

from __future__ import annotations

import pytest

from sandbox_backup import errors
from sandbox_backup.registry import Manifest, RegistryClient, mediatypes
from sandbox_backup.registry.manifests import compute_digest, find_structure_problem


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("https://registry.example/", "https://registry.example"),
        ("  http://127.0.0.1:5000  ", "http://127.0.0.1:5000"),
    ],
)
async def test_url_is_normalized(url: str, expected: str) -> None:
    async with RegistryClient(url) as client:
        assert client.url == expected


@pytest.mark.parametrize(
    "url",
    [
        "127.0.0.1:5000",
        "ftp://127.0.0.1:5000",
        "http://",
        "http://127.0.0.1:5000/v2/",
        "http://127.0.0.1:5000?x=1",
        "http://user:secret@127.0.0.1:5000",
    ],
)
def test_bad_url_is_rejected(url: str) -> None:
    with pytest.raises(errors.InvalidInput) as caught:
        RegistryClient(url)

    assert "secret" not in str(caught.value)


def test_username_without_password_is_rejected() -> None:
    with pytest.raises(errors.InvalidInput):
        RegistryClient("http://127.0.0.1:5000", username="backup")


@pytest.mark.parametrize("timeout_s", [0, -1.0])
def test_non_positive_timeout_is_rejected(timeout_s: float) -> None:
    with pytest.raises(errors.InvalidInput):
        RegistryClient("http://127.0.0.1:5000", timeout_s=timeout_s)


async def test_repr_hides_password() -> None:
    async with RegistryClient("http://127.0.0.1:5000", username="backup", password="secret") as client:
        assert "secret" not in repr(client)


def test_accept_header_lists_all_manifest_types() -> None:
    accepted = [item.strip() for item in mediatypes.MANIFEST_ACCEPT.split(",")]

    assert accepted == [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]


def test_compute_digest_sha256_and_sha512() -> None:
    assert compute_digest(b"") == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert compute_digest(b"", "sha512").startswith("sha512:cf83e1357eefb8bd")


@pytest.mark.parametrize(
    ("media_type", "content", "problem"),
    [
        (mediatypes.OCI_MANIFEST, {"layers": []}, "'config' is not a descriptor with a digest"),
        (mediatypes.OCI_MANIFEST, {"config": {"digest": "sha256:a"}}, "'layers' is not a list"),
        (
            mediatypes.DOCKER_MANIFEST,
            {"config": {"digest": "sha256:a"}, "layers": [{}]},
            "layers[0] is not a descriptor with a digest",
        ),
        (mediatypes.OCI_INDEX, {"manifests": "x"}, "'manifests' is not a list"),
        (
            mediatypes.DOCKER_MANIFEST_LIST,
            {"manifests": [{"digest": 1}]},
            "manifests[0] is not a descriptor with a digest",
        ),
    ],
)
def test_structure_problem_is_named(media_type: str, content: dict, problem: str) -> None:
    assert find_structure_problem(media_type, content) == problem


def test_sound_manifest_has_no_structure_problem() -> None:
    content = {"config": {"digest": "sha256:a"}, "layers": [{"digest": "sha256:b"}]}

    assert find_structure_problem(mediatypes.OCI_MANIFEST, content) is None
    assert find_structure_problem("application/vnd.docker.distribution.manifest.v1+prettyjws", {}) is None


def test_manifest_digest_accessors() -> None:
    content = {"config": {"digest": "sha256:c"}, "layers": [{"digest": "sha256:l1"}, {"digest": "sha256:l2"}]}
    manifest = Manifest(digest="sha256:m", media_type=mediatypes.OCI_MANIFEST, content=content, raw=b"{}")

    assert manifest.config_digest == "sha256:c"
    assert manifest.layer_digests == ("sha256:l1", "sha256:l2")
    assert manifest.child_digests == ()
    assert manifest.size == 2
    assert not manifest.is_index
