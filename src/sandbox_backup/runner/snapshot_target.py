"""Checks of a snapshot reference against the registry that a request names."""

from __future__ import annotations

from sandbox_backup import errors
from sandbox_backup.domain.reference import ImageReference, parse_reference, registry_host


def validate_snapshot_target(snapshot: str, registry_url: str, *, for_push: bool) -> ImageReference:
    """Parse `snapshot` and check that its host is the registry's host; raise InvalidInput if not.

    The registry credentials of the request go to the snapshot's host, so a different host
    would receive them. A push target also needs a tag and no digest, because the engine
    pushes a tag and the registry computes the digest.
    """
    reference = parse_reference(snapshot)
    host = registry_host(registry_url)

    # NOTE: the comparison is textual, so "localhost:5000" and "127.0.0.1:5000" differ
    # even though they reach the same registry.
    if reference.host.lower() != host.lower():
        raise errors.InvalidInput(
            f"snapshot {snapshot!r} is on host {reference.host!r} but the registry url {registry_url!r} is on "
            f"{host!r}: the registry credentials are only sent to the registry's own host, so use a snapshot on it"
        )
    if for_push and (reference.tag is None or reference.digest is not None):
        raise errors.InvalidReference(
            f"snapshot {snapshot!r} must be host/repository:tag without a digest, because the backup pushes a tag"
        )
    return reference
