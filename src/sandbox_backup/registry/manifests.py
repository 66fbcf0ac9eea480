"""Manifest descriptors returned by the registry client, and digest computation."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from sandbox_backup.registry import mediatypes

# Digest algorithms from the OCI image spec ("Digests") that this client can compute.
_HASHES = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}


@dataclasses.dataclass(frozen=True)
class ManifestInfo:
    """Digest, media type and size in bytes of a manifest, as a HEAD request reports them."""

    digest: str
    media_type: str
    size: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A fetched manifest: its digest, media type, parsed JSON and the exact bytes it was hashed from."""

    digest: str
    media_type: str
    content: dict[str, Any] = dataclasses.field(compare=False, repr=False)
    raw: bytes = dataclasses.field(repr=False)

    @property
    def size(self) -> int:
        return len(self.raw)

    @property
    def info(self) -> ManifestInfo:
        return ManifestInfo(self.digest, self.media_type, self.size)

    @property
    def is_index(self) -> bool:
        return self.media_type in mediatypes.INDEX_MEDIA_TYPES

    @property
    def config_digest(self) -> str | None:
        """Digest of the image config blob, or None for an index or a manifest without one."""
        config = self.content.get("config")
        return _descriptor_digest(config)

    @property
    def layer_digests(self) -> tuple[str, ...]:
        """Digests of the layer blobs, in manifest order; empty for an index.

        The client checks the descriptor lists when it fetches a manifest, so no entry is skipped.
        """
        return _descriptor_digests(self.content.get("layers"))

    @property
    def child_digests(self) -> tuple[str, ...]:
        """Digests of the manifests an index lists; empty for an image manifest."""
        return _descriptor_digests(self.content.get("manifests"))


def digest_algorithm(digest: str) -> str:
    """Return the algorithm part of `algorithm:hex`."""
    return digest.partition(":")[0]


def is_supported_algorithm(algorithm: str) -> bool:
    return algorithm in _HASHES


def compute_digest(data: bytes, algorithm: str = "sha256") -> str:
    """Return `algorithm:hex` of `data`; raises KeyError for an algorithm outside sha256 and sha512."""
    return f"{algorithm}:{_HASHES[algorithm](data).hexdigest()}"


def find_structure_problem(media_type: str, content: dict[str, Any]) -> str | None:
    """Return what breaks the descriptor lists of an image manifest or index, or None if they are sound.

    Image manifests need a `config` descriptor and a `layers` list, and indexes a `manifests`
    list, each descriptor with a string `digest`. Other media types are not checked.
    """
    if media_type in mediatypes.IMAGE_MANIFEST_MEDIA_TYPES:
        if _descriptor_digest(content.get("config")) is None:
            return "'config' is not a descriptor with a digest"
        return _find_list_problem(content, "layers")

    if media_type in mediatypes.INDEX_MEDIA_TYPES:
        return _find_list_problem(content, "manifests")

    return None


def _find_list_problem(content: dict[str, Any], field: str) -> str | None:
    descriptors = content.get(field)
    if not isinstance(descriptors, list):
        return f"{field!r} is not a list"
    for position, descriptor in enumerate(descriptors):
        if _descriptor_digest(descriptor) is None:
            return f"{field}[{position}] is not a descriptor with a digest"
    return None


def _descriptor_digest(descriptor: object) -> str | None:
    if isinstance(descriptor, dict) and isinstance(descriptor.get("digest"), str):
        return descriptor["digest"]
    return None


def _descriptor_digests(descriptors: object) -> tuple[str, ...]:
    if not isinstance(descriptors, list):
        return ()
    return tuple(descriptor["digest"] for descriptor in descriptors)
