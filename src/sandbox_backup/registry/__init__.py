"""Client for OCI distribution registries: manifests, blobs, tags and deletes over the v2 API."""

from sandbox_backup.registry.auth import RegistryAuth
from sandbox_backup.registry.client import RegistryClient
from sandbox_backup.registry.manifests import Manifest, ManifestInfo

__all__ = ["Manifest", "ManifestInfo", "RegistryAuth", "RegistryClient"]
