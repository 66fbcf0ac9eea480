"""Media types of manifests, image configs and layers, and the manifest Accept header.

Sources: the OCI image spec (media-types.md) and the Docker image manifest v2 schema 2 spec.
"""

from __future__ import annotations

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

# The order is the order of preference sent to the registry.
MANIFEST_MEDIA_TYPES: tuple[str, ...] = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)
IMAGE_MANIFEST_MEDIA_TYPES: frozenset[str] = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_MEDIA_TYPES: frozenset[str] = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})

# The registry converts a manifest to the old schema 1, which has another digest, unless the
# request accepts the manifest's own type. Sending all four types makes HEAD and GET return the
# digest that the push printed (checked with distribution 2.8).
MANIFEST_ACCEPT = ", ".join(MANIFEST_MEDIA_TYPES)

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
