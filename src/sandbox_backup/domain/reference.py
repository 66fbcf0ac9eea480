"""Image references for backups, built and checked against the OCI distribution grammar.

Facts relied on (OCI distribution spec, "Pulling manifests"):
- a repository name matches `[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*(\\/[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*)*`;
- a tag matches `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`;
- many registries cap the whole repository name at 255 characters.
"""

from __future__ import annotations

import dataclasses
import datetime
import re

from sandbox_backup import errors

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
REPOSITORY_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
TAG_RE = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$")
DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
MAX_REPOSITORY_LENGTH = 255
MAX_SANDBOX_ID_LENGTH = 128
DEFAULT_PROJECT = "sandbox-backup"
REPOSITORY_PREFIX = "backup-"


@dataclasses.dataclass(frozen=True)
class ImageReference:
    """A parsed `host/repository:tag` or `host/repository@digest` reference."""

    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        text = f"{self.host}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def validate_sandbox_id(sandbox_id: str) -> str:
    """Return `sandbox_id` if it can be a repository path component, else raise InvalidReference."""
    if not re.fullmatch(_COMPONENT, sandbox_id or "", flags=re.ASCII) or len(sandbox_id) > MAX_SANDBOX_ID_LENGTH:
        raise errors.InvalidReference(
            f"sandbox id {sandbox_id!r} cannot form an image reference: use at most {MAX_SANDBOX_ID_LENGTH} "
            "lowercase letters, digits and '.', '_' or '-' separators, starting and ending with a letter or digit"
        )
    return sandbox_id


def registry_host(url: str) -> str:
    """Return the `host[:port]` part of a registry URL such as `https://127.0.0.1:5000`."""
    host = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", url.strip()).rstrip("/")
    if not host or "/" in host:
        raise errors.InvalidInput(f"registry url {url!r} must be a scheme and host, like http://127.0.0.1:5000")
    return host


def backup_repository(project: str | None, sandbox_id: str) -> str:
    """Return the repository that holds every backup of one sandbox: `{project}/backup-{id}`."""
    project = (project or DEFAULT_PROJECT).strip("/")
    repository = f"{project}/{REPOSITORY_PREFIX}{validate_sandbox_id(sandbox_id)}"
    if not REPOSITORY_RE.fullmatch(repository) or len(repository) > MAX_REPOSITORY_LENGTH:
        raise errors.InvalidReference(
            f"repository {repository!r} is not a valid OCI repository name; check the registry project"
        )
    return repository


def backup_tag(now: datetime.datetime) -> str:
    """Return a sortable UTC timestamp tag, such as `20261204T204721.123456Z`."""
    return now.astimezone(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def build_backup_reference(registry_url: str, project: str | None, sandbox_id: str, now: datetime.datetime) -> str:
    """Return `{registry host}/{project}/backup-{sandbox id}:{UTC timestamp}`."""
    return str(ImageReference(registry_host(registry_url), backup_repository(project, sandbox_id), tag=backup_tag(now)))


def parse_reference(reference: str) -> ImageReference:
    """Split `host/repository[:tag][@digest]`; the host part is required."""
    name, _, digest = reference.partition("@")
    host, slash, rest = name.partition("/")
    if not slash or not rest:
        raise errors.InvalidReference(f"image reference {reference!r} has no registry host")
    repository, tag = rest, None
    if ":" in rest.rsplit("/", 1)[-1]:
        repository, _, tag = rest.rpartition(":")
    if not REPOSITORY_RE.fullmatch(repository):
        raise errors.InvalidReference(f"image reference {reference!r} has an invalid repository {repository!r}")
    if tag is not None and not TAG_RE.fullmatch(tag):
        raise errors.InvalidReference(f"image reference {reference!r} has an invalid tag {tag!r}")
    if digest and not DIGEST_RE.fullmatch(digest):
        raise errors.InvalidReference(f"image reference {reference!r} has an invalid digest {digest!r}")
    return ImageReference(host, repository, tag=tag, digest=digest or None)
