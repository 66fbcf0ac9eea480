"""Flattening of a committed image into a single layer, run in the engine's worker thread.

Every commit adds one layer on top of the container's image, so a sandbox that is backed
up and restored again and again gains one layer per cycle. The overlay storage driver
limits that depth: on Podman 4.3.1 a container starts from an image of 128 layers and
fails with "max depth exceeded" at 129 (measured by committing a busybox container in a
loop), although commits still succeed past it. The runner therefore flattens a committed
image whose layer count passes a threshold, before it pushes it.

Both methods start from a container that is created from the committed image and never
started, so the engine copies the image's whole configuration into it:

1. Squash commit: commit that container with `squash=true`. Podman's compatible /commit
   accepts this parameter (checked on 4.3.1) and writes one layer with the configuration
   of the image, including the healthcheck and shell, which Podman's compatible inspect
   leaves out.
2. Export and import, for engines that ignore `squash`. Docker Engine's /commit reads no
   such parameter (moby's api/server/router/container/container_routes.go). The method
   exports the container's filesystem into a temporary file and imports it with the
   configuration written as Dockerfile instructions (`changes`), which cannot express SHELL.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import pathlib
import re
import tempfile
import uuid
from typing import Any, BinaryIO

import docker
import docker.errors
import requests

from sandbox_backup import errors
from sandbox_backup.runner.push_stream import StreamAbort, decode_stream, stream_error

logger = logging.getLogger(__name__)

TEMP_FILE_PREFIX = "flatten-"
CONTAINER_NAME_PREFIX = "sandbox-backup-flatten-"
EXPORT_CHUNK_BYTES = 1024 * 1024

# Values that both Podman and Docker read the same way without quotes.
_PLAIN_VALUE_RE = re.compile(r"^[A-Za-z0-9_./:@+-]+$")


class FlattenMethod(str, enum.Enum):
    SQUASH = "squash"
    EXPORT_IMPORT = "export-import"


class FlattenError(errors.EngineError):
    """Failure to flatten a committed image, raised after the flatten removed what it created."""


class ImageFlattener:
    """Flattener of images on one engine. The export-and-import method writes its export into `temp_dir`."""

    def __init__(self, api: docker.APIClient, temp_dir: pathlib.Path, *, timeout_s: float) -> None:
        self._api = api
        self._temp_dir = temp_dir
        self._timeout_s = timeout_s

    def flatten(self, image_id: str, abort: StreamAbort, *, sandbox_id: str) -> tuple[str, FlattenMethod]:
        """Create a one-layer copy of `image_id` and return its id and the method used.

        The new image is untagged, and the caller tags it. Raises FlattenError, or the
        engine's error, after removing the container and images that this call created.
        """
        extra = {"action": "flatten_image", "sandbox_id": sandbox_id, "image_id": image_id}
        config = self._api.inspect_image(image_id).get("Config") or {}
        container_id = self._create_source_container(image_id, sandbox_id)
        try:
            squashed_id = self._squash(container_id, extra)
            if squashed_id is not None:
                return squashed_id, FlattenMethod.SQUASH

            logger.info(
                "the engine ignored squash=true on commit, so image %s is flattened by export and import instead",
                image_id,
                extra=extra,
            )
            if abort.aborted:
                raise FlattenError(f"flattening of image {image_id} was aborted")
            imported_id = export_and_import(self._api, container_id, config, self._temp_dir, abort)
            return imported_id, FlattenMethod.EXPORT_IMPORT
        finally:
            self._remove_container(container_id, extra)

    def _squash(self, container_id: str, extra: dict[str, str]) -> str | None:
        """Commit the container with squash=true and return the image id, or None if the engine ignored squash.

        An image with more than one layer means the engine ignored squash: it is removed.
        """
        squashed_id = self._squash_commit(container_id)
        try:
            squashed_layers = count_layers(self._api.inspect_image(squashed_id))
        except BaseException:
            self._remove_image(squashed_id, extra)
            raise

        if squashed_layers == 1:
            return squashed_id
        self._remove_image(squashed_id, extra)
        return None

    def _create_source_container(self, image_id: str, sandbox_id: str) -> str:
        # No labels: a commit writes the container's labels into the image. The network is
        # "none" so that an engine sets up nothing for a container that never runs.
        created = self._api.create_container(
            image=image_id,
            name=f"{CONTAINER_NAME_PREFIX}{sandbox_id}-{uuid.uuid4().hex[:8]}",
            host_config=self._api.create_host_config(network_mode="none"),
        )
        return str(created["Id"])

    def _squash_commit(self, container_id: str) -> str:
        # docker-py's commit() has no squash argument, so this sends the request itself.
        url = f"{self._api.base_url}/v{self._api.api_version}/commit"
        response = self._api.post(
            url,
            params={"container": container_id, "squash": "true", "pause": "false"},
            json={},
            timeout=self._timeout_s,
        )
        if response.status_code >= 400:
            raise FlattenError(
                f"squash commit of container {container_id} failed with status {response.status_code}: "
                f"{response.text[:500]}",
                transient=response.status_code >= 500,
            )
        return str(response.json()["Id"])

    def _remove_container(self, container_id: str, extra: dict[str, str]) -> None:
        try:
            self._api.remove_container(container_id, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except (docker.errors.APIError, requests.RequestException) as exc:
            logger.error(
                "temporary container %s could not be removed: %s; remove it with `podman rm -f` or `docker rm -f`",
                container_id,
                exc,
                extra=extra,
            )

    def _remove_image(self, image_id: str, extra: dict[str, str]) -> None:
        remove_image_quietly(self._api, image_id, extra)


def count_layers(image_attrs: dict[str, Any]) -> int:
    """Return the number of filesystem layers in an image inspect result."""
    return len((image_attrs.get("RootFS") or {}).get("Layers") or [])


def export_and_import(
    api: docker.APIClient, container_id: str, config: dict[str, Any], temp_dir: pathlib.Path, abort: StreamAbort
) -> str:
    """Export a container's filesystem into a temporary file in `temp_dir`, import it, return the image id.

    The file is removed in every case. `config` is the image configuration (the `Config`
    of an image inspect) that the import applies, and `import_changes` lists what it keeps.
    """
    changes = import_changes(config)
    temp_dir.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=TEMP_FILE_PREFIX, suffix=".tar", dir=temp_dir)
    path = pathlib.Path(name)
    try:
        with os.fdopen(descriptor, "wb") as file:
            _export_to_file(api, container_id, file, abort)
        if abort.aborted:
            raise FlattenError(f"flattening of container {container_id} was aborted after its export")
        return _import_file(api, path, changes)
    finally:
        path.unlink(missing_ok=True)


def remove_stale_temp_files(temp_dir: pathlib.Path) -> list[pathlib.Path]:
    """Delete the export files that an agent left behind when it stopped during a flatten, and return their paths."""
    removed = []
    for path in temp_dir.glob(f"{TEMP_FILE_PREFIX}*.tar"):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def remove_image_quietly(api: docker.APIClient, image_id: str, extra: dict[str, str]) -> None:
    """Remove an image by id, and log an error instead of raising when the engine rejects the removal.

    Only for images that a flatten created: `force` also removes a tag that the image
    carries, and on Podman it would also remove containers that use the image.
    """
    try:
        api.remove_image(image_id, force=True)
    except docker.errors.NotFound:
        pass
    except (docker.errors.APIError, requests.RequestException) as exc:
        logger.error(
            "intermediate image %s could not be removed: %s; remove it with `podman rmi` or `docker rmi`",
            image_id,
            exc,
            extra=extra,
        )


def import_changes(config: dict[str, Any]) -> list[str]:
    """Return the Dockerfile instructions that give an imported image the configuration `config`.

    Kept: entrypoint, cmd, env, working directory, user, labels, exposed ports, stop
    signal, volumes, onbuild and healthcheck. Not kept: SHELL, because neither Docker nor
    Podman accept it as a change.
    NOTE: the quoting follows Docker's Dockerfile rules. Podman 4.3 only strips the outer
    quotes, so on Podman an env or label value that contains a backslash, a double quote or
    a dollar sign keeps the escaping backslashes. Podman normally takes the squash path.
    """
    changes: list[str] = []
    if config.get("Entrypoint"):
        changes.append(f"ENTRYPOINT {json.dumps(config['Entrypoint'])}")
    if config.get("Cmd"):
        changes.append(f"CMD {json.dumps(config['Cmd'])}")
    for variable in config.get("Env") or []:
        name, _, value = variable.partition("=")
        changes.append(f"ENV {name}={_quote(value)}")
    if config.get("WorkingDir"):
        changes.append(f"WORKDIR {_word(config['WorkingDir'])}")
    if config.get("User"):
        changes.append(f"USER {_word(config['User'])}")
    for name, value in sorted((config.get("Labels") or {}).items()):
        changes.append(f"LABEL {_quote(name)}={_quote(value)}")
    for port in sorted(config.get("ExposedPorts") or {}):
        changes.append(f"EXPOSE {port}")
    if config.get("StopSignal"):
        changes.append(f"STOPSIGNAL {_word(config['StopSignal'])}")
    if config.get("Volumes"):
        changes.append(f"VOLUME {json.dumps(sorted(config['Volumes']))}")
    for trigger in config.get("OnBuild") or []:
        changes.append(f"ONBUILD {trigger}")
    if config.get("Healthcheck"):
        changes.append(_healthcheck_instruction(config["Healthcheck"]))
    return changes


def _export_to_file(api: docker.APIClient, container_id: str, file: BinaryIO, abort: StreamAbort) -> None:
    # docker-py's export() hides the HTTP response, and only the response lets another
    # thread abort the stream, so this sends the same request itself.
    url = f"{api.base_url}/v{api.api_version}/containers/{container_id}/export"
    if abort.aborted:
        raise FlattenError(f"export of container {container_id} was aborted before it started")
    response = api.get(url, stream=True, timeout=api.timeout)
    abort.attach(response)
    try:
        if response.status_code >= 400:
            raise FlattenError(
                f"export of container {container_id} failed with status {response.status_code}: {response.text[:500]}",
                transient=response.status_code >= 500,
            )
        for chunk in response.iter_content(EXPORT_CHUNK_BYTES):
            file.write(chunk)
    except requests.RequestException as exc:
        if abort.aborted:
            raise FlattenError(f"export of container {container_id} was aborted") from exc
        raise FlattenError(f"export of container {container_id} failed: {exc}", transient=True) from exc
    finally:
        abort.detach()
        response.close()


def _import_file(api: docker.APIClient, path: pathlib.Path, changes: list[str]) -> str:
    # Posting an open file sends a Content-Length body. docker-py's import_image_from_stream
    # marks a file body as chunked without chunking it, which Podman 4.3 rejects.
    url = f"{api.base_url}/v{api.api_version}/images/create"
    with path.open("rb") as file:
        response = api.post(
            url,
            params={"fromSrc": "-", "changes": changes},
            data=file,
            headers={"Content-Type": "application/tar"},
            timeout=api.timeout,
        )
    items = list(decode_stream(response.content.splitlines()))
    image_id = _imported_image_id(items)

    # Podman 4.3 reports a failed upload and still imports what it received, so an error
    # may come with an image id: that partial image is removed.
    message = next((text for text in map(stream_error, items) if text), None)
    if response.status_code >= 400 and message is None:
        message = response.text[:500]
    if message is not None:
        if image_id is not None:
            remove_image_quietly(api, image_id, {"action": "flatten_image", "image_id": image_id})
        raise FlattenError(
            f"import of the exported filesystem failed: {message}", transient=response.status_code >= 500
        )
    if image_id is None:
        raise FlattenError(f"import of the exported filesystem returned no image id: {response.text[:500]}")
    return image_id


def _imported_image_id(items: list[dict[str, Any]]) -> str | None:
    # Docker sends the id as the status of the last item, Podman also as "id".
    for item in reversed(items):
        for key in ("id", "status"):
            value = str(item.get(key) or "")
            if value.startswith("sha256:"):
                return value
    return None


def _healthcheck_instruction(healthcheck: dict[str, Any]) -> str:
    test = list(healthcheck.get("Test") or [])
    if not test or test[0] == "NONE":
        return "HEALTHCHECK NONE"

    options = []
    for key, flag in (("Interval", "interval"), ("Timeout", "timeout"), ("StartPeriod", "start-period")):
        if healthcheck.get(key):
            options.append(f"--{flag}={int(healthcheck[key])}ns")
    if healthcheck.get("Retries"):
        options.append(f"--retries={int(healthcheck['Retries'])}")

    # "CMD" runs its arguments directly, "CMD-SHELL" runs one string with the image's shell.
    command = json.dumps(test[1:]) if test[0] == "CMD" else " ".join(test[1:])
    return " ".join(["HEALTHCHECK", *options, "CMD", command])


def _quote(value: str) -> str:
    if "\n" in value:
        raise FlattenError(
            f"image config value {value[:80]!r} contains a newline, which a Dockerfile instruction cannot express,"
            " so this engine cannot flatten the image by export and import"
        )
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{escaped}"'


def _word(value: str) -> str:
    return value if _PLAIN_VALUE_RE.match(value) else _quote(value)
