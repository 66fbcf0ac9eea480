"""Look-up of a pushed manifest's digest with a HEAD request to the registry.

The push stream of Docker and of Podman 4.3 carries the digest, so this runs only when an
engine leaves it out. The registry client sends all four manifest media types in the
Accept header, because the registry converts a manifest whose type the request does not
accept, and the converted manifest has another digest.
"""

from __future__ import annotations

import logging

from sandbox_backup import errors
from sandbox_backup.domain.reference import parse_reference
from sandbox_backup.registry import RegistryClient
from sandbox_backup.runner.models import RegistryCredentials

logger = logging.getLogger(__name__)


async def resolve_manifest_digest(
    reference: str, registry: RegistryCredentials, *, timeout_s: float = 30.0
) -> str | None:
    """Return the `sha256:...` digest of the manifest that `reference` names, or None.

    None also stands for a failed look-up, which is logged: a backup without a digest is
    still usable by its tag.
    """
    parsed = parse_reference(reference)
    # RegistryClient takes both credentials or neither.
    username = registry.username or None
    password = None
    if username is not None:
        password = registry.password.get_secret_value() if registry.password else ""
    extra = {"action": "resolve_digest", "reference": reference}

    try:
        async with RegistryClient(registry.url, username=username, password=password, timeout_s=timeout_s) as client:
            info = await client.head_manifest(parsed.repository, parsed.digest or parsed.tag or "latest")
    except (errors.RegistryError, errors.InvalidInput) as exc:
        logger.warning("digest look-up of %s failed: %s", reference, exc, extra=extra)
        return None

    if info is None:
        logger.warning("digest look-up of %s failed: the registry has no such manifest", reference, extra=extra)
        return None
    return info.digest
