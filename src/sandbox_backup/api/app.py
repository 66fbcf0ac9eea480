"""The manager's REST API (FastAPI). Every path but /health and /metrics needs `Authorization: Bearer <token>`.

The admin token (`api_token`) is allowed on every call under /api/v1. The optional read-only token
(`api_read_token`) is allowed only on GET calls there. Runner report and discovery calls carry the
runner's own token instead.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from typing import Annotated

import fastapi
from fastapi import status
from sqlalchemy import exc as sa_exc
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from sandbox_backup import errors, metrics
from sandbox_backup.api import discovery_routes, schemas
from sandbox_backup.domain import reference
from sandbox_backup.domain.states import BackupState, RestorePurpose, RunnerState, SandboxBackupState, SandboxState
from sandbox_backup.manager import drain, lifecycle, registration, restore, retention, tracking, verification
from sandbox_backup.manager.service import BackupManager
from sandbox_backup.runner.models import BackupReport
from sandbox_backup.store import backups, cleanup, fleet, restores, sandboxes

logger = logging.getLogger(__name__)

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Upper bound of `offset` on the list endpoints, which keeps huge numbers out of the SQL OFFSET clause.
MAX_OFFSET = 2**31 - 1

ERROR_STATUS = {
    errors.InvalidInput: status.HTTP_400_BAD_REQUEST,
    errors.NotFound: status.HTTP_404_NOT_FOUND,
    errors.Conflict: status.HTTP_409_CONFLICT,
    errors.ReportRejected: status.HTTP_401_UNAUTHORIZED,
}


def _bearer(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _token_matches(token: str, expected: str) -> bool:
    # An unset token never matches, and the comparison takes constant time.
    return bool(expected) and hmac.compare_digest(token.encode(), expected.encode())


def create_app(manager: BackupManager) -> fastapi.FastAPI:
    """Build the API app around a manager."""
    app = fastapi.FastAPI(title="sandbox-backup manager", version="0.1.0")
    ctx = manager.ctx
    admin_token = ctx.settings.api_token.get_secret_value()
    read_token = ctx.settings.api_read_token.get_secret_value() if ctx.settings.api_read_token else ""

    async def require_token(request: fastapi.Request, authorization: Annotated[str | None, fastapi.Header()] = None) -> None:
        token = _bearer(authorization)
        if _token_matches(token, admin_token):
            return
        if _token_matches(token, read_token):
            if request.method == "GET":
                return
            raise fastapi.HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"the read-only token may call only GET endpoints under /api/v1, not {request.method}. Send the admin token (api_token) for this call.",
            )
        raise fastapi.HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong bearer token; send Authorization: Bearer <api token>")

    _install_error_handlers(app)
    api = fastapi.APIRouter(prefix="/api/v1", dependencies=[fastapi.Depends(require_token)])
    reports = fastapi.APIRouter(prefix="/api/v1")

    @app.get("/health", tags=["health"])
    async def get_health() -> dict[str, str]:
        return {"status": "ok"}

    # No token, like /health: the exposition holds counts and ids, never a secret.
    @app.get("/metrics", tags=["health"], response_class=fastapi.responses.PlainTextResponse)
    async def get_metrics() -> fastapi.Response:
        await ctx.metrics.refresh(ctx.db, now=ctx.now(), contention_count=ctx.coordinator.contention_count)
        return fastapi.Response(ctx.metrics.render(), media_type=metrics.CONTENT_TYPE)

    @api.put("/runners/{runner_id}", response_model=schemas.RunnerOut, tags=["runners"])
    async def put_runner(runner_id: str, body: schemas.RunnerIn) -> schemas.RunnerOut:
        _check_id(runner_id, "runner id")
        async with ctx.db.transaction() as session:
            runner = await fleet.upsert_runner(
                session,
                runner_id=runner_id,
                api_url=str(body.api_url).rstrip("/"),
                token=body.token.get_secret_value(),
                now=ctx.now(),
                state=body.state,
                region=body.region,
                capacity=body.capacity,
                max_concurrent_backups=body.max_concurrent_backups,
            )
        logger.info("runner registered", extra={"action": "runner_registered", "runner_id": runner_id, "state": body.state.value})
        return schemas.RunnerOut.model_validate(runner)

    @api.get("/runners", response_model=list[schemas.RunnerOut], tags=["runners"])
    async def get_runners() -> list[schemas.RunnerOut]:
        async with ctx.db.transaction() as session:
            return [schemas.RunnerOut.model_validate(r) for r in await fleet.list_runners(session)]

    @api.put("/registries/{registry_id}", response_model=schemas.RegistryOut, tags=["registries"])
    async def put_registry(registry_id: str, body: schemas.RegistryIn) -> schemas.RegistryOut:
        _check_id(registry_id, "registry id")
        url = _registry_url(body)
        async with ctx.db.transaction() as session:
            registry = await fleet.upsert_registry(
                session,
                registry_id=registry_id,
                url=url,
                now=ctx.now(),
                project=body.project,
                username=body.username,
                password=body.password.get_secret_value() if body.password else None,
                region=body.region,
                organization_id=body.organization_id,
                is_default=body.is_default,
            )
        logger.info("registry registered", extra={"action": "registry_registered", "registry_id": registry_id, "url": url})
        return schemas.RegistryOut.model_validate(registry)

    @api.get("/registries", response_model=list[schemas.RegistryOut], tags=["registries"])
    async def get_registries() -> list[schemas.RegistryOut]:
        async with ctx.db.transaction() as session:
            return [schemas.RegistryOut.model_validate(r) for r in await fleet.list_registries(session)]

    async def sandbox_out(sandbox) -> schemas.SandboxOut:  # type: ignore[no-untyped-def]
        async with ctx.db.transaction() as session:
            owed = await cleanup.owed_count(session, sandbox_id=sandbox.id)
        return schemas.SandboxOut.model_validate(sandbox).model_copy(update={"owed_deletions": owed})

    @api.put("/sandboxes/{sandbox_id}", response_model=schemas.SandboxOut, tags=["sandboxes"])
    async def put_sandbox(sandbox_id: str, body: schemas.SandboxIn) -> schemas.SandboxOut:
        return await sandbox_out(await lifecycle.upsert_sandbox(ctx, sandbox_id, _sandbox_fields(body)))

    @api.post("/sandboxes/batch", response_model=schemas.SandboxBatchOut, tags=["sandboxes"])
    async def post_sandbox_batch(body: schemas.SandboxBatchIn) -> schemas.SandboxBatchOut:
        """Record up to 1000 sandboxes in one call, all or none; each is handled as its own PUT would be."""
        result = await registration.upsert_sandboxes(ctx, [(item.id, _sandbox_fields(item)) for item in body.sandboxes])
        return schemas.SandboxBatchOut(recorded=result.recorded, created=result.created, backups_queued=result.backups_queued)

    @api.get("/sandboxes/{sandbox_id}", response_model=schemas.SandboxOut, tags=["sandboxes"])
    async def get_sandbox(sandbox_id: str) -> schemas.SandboxOut:
        return await sandbox_out(await lifecycle.get_sandbox(ctx, sandbox_id))

    @api.get("/sandboxes", response_model=list[schemas.SandboxOut], tags=["sandboxes"])
    async def list_sandboxes(
        limit: Annotated[int, fastapi.Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, fastapi.Query(ge=0, le=MAX_OFFSET)] = 0,
        state: Annotated[SandboxState | None, fastapi.Query(description="Only sandboxes in this state.")] = None,
        backup_state: Annotated[SandboxBackupState | None, fastapi.Query(alias="backupState", description="Only sandboxes whose current backup is in this state.")] = None,
        runner_id: Annotated[str | None, fastapi.Query(alias="runnerId", min_length=1, max_length=128, description="Only sandboxes on this runner.")] = None,
        organization_id: Annotated[str | None, fastapi.Query(alias="organizationId", min_length=1, max_length=128, description="Only sandboxes of this organization.")] = None,
    ) -> list[schemas.SandboxOut]:
        async with ctx.db.transaction() as session:
            rows = await sandboxes.list_sandboxes(
                session, limit=limit, offset=offset, state=state, backup_state=backup_state, runner_id=runner_id, organization_id=organization_id
            )
            owed = await cleanup.owed_counts(session, [row.id for row in rows])
        return [schemas.SandboxOut.model_validate(row).model_copy(update={"owed_deletions": owed.get(row.id, 0)}) for row in rows]

    @api.post("/sandboxes/{sandbox_id}/events", response_model=schemas.SandboxOut, tags=["sandboxes"])
    async def post_event(sandbox_id: str, body: schemas.EventIn) -> schemas.SandboxOut:
        if body.type == lifecycle.LifecycleEvent.BACKUP_REQUESTED:
            await lifecycle.request_backup(ctx, sandbox_id)
        else:
            await lifecycle.handle_event(ctx, sandbox_id, body.type)
        return await sandbox_out(await lifecycle.get_sandbox(ctx, sandbox_id))

    @api.post("/sandboxes/{sandbox_id}/backup", response_model=schemas.BackupOut, status_code=status.HTTP_202_ACCEPTED, tags=["backups"])
    async def post_backup(sandbox_id: str) -> schemas.BackupOut:
        return schemas.BackupOut.model_validate(await lifecycle.request_backup(ctx, sandbox_id))

    @api.get("/sandboxes/{sandbox_id}/backups", response_model=list[schemas.BackupOut], tags=["backups"])
    async def list_backups(
        sandbox_id: str,
        limit: Annotated[int, fastapi.Query(ge=1, le=1000)] = 1000,
        offset: Annotated[int, fastapi.Query(ge=0, le=MAX_OFFSET)] = 0,
        state: Annotated[BackupState | None, fastapi.Query(description="Only attempts in this state.")] = None,
    ) -> list[schemas.BackupOut]:
        await lifecycle.get_sandbox(ctx, sandbox_id)
        async with ctx.db.transaction() as session:
            rows = await backups.list_for_sandbox(session, sandbox_id, limit=limit, offset=offset, state=state)
        return [schemas.BackupOut.model_validate(b) for b in rows]

    @api.get("/backups/{backup_id}", response_model=schemas.BackupOut, tags=["backups"])
    async def get_backup(backup_id: str) -> schemas.BackupOut:
        async with ctx.db.transaction() as session:
            backup = await backups.get_backup(session, backup_id)
        if backup is None:
            raise errors.NotFound(f"backup {backup_id!r} does not exist")
        return schemas.BackupOut.model_validate(backup)

    @api.post("/sandboxes/{sandbox_id}/restore", response_model=schemas.RestoreOut, status_code=status.HTTP_202_ACCEPTED, tags=["restores"])
    async def post_restore(sandbox_id: str, body: schemas.RestoreIn | None = None) -> schemas.RestoreOut:
        body = body or schemas.RestoreIn()
        started = await restore.request_restore(ctx, sandbox_id, backup_id=body.backup_id, runner_id=body.runner_id)
        return schemas.RestoreOut.model_validate(started)

    @api.post("/sandboxes/{sandbox_id}/drill", response_model=schemas.RestoreOut, status_code=status.HTTP_202_ACCEPTED, tags=["restores"])
    async def post_drill(sandbox_id: str, body: schemas.RestoreIn | None = None) -> schemas.RestoreOut:
        body = body or schemas.RestoreIn()
        started = await restore.request_restore(ctx, sandbox_id, backup_id=body.backup_id, runner_id=body.runner_id, purpose=RestorePurpose.DRILL)
        return schemas.RestoreOut.model_validate(started)

    @api.get("/sandboxes/{sandbox_id}/restores", response_model=list[schemas.RestoreOut], tags=["restores"])
    async def list_restores(sandbox_id: str) -> list[schemas.RestoreOut]:
        await lifecycle.get_sandbox(ctx, sandbox_id)
        async with ctx.db.transaction() as session:
            rows = await restores.list_for_sandbox(session, sandbox_id)
        return [schemas.RestoreOut.model_validate(r) for r in rows]

    @api.get("/restores/{restore_id}", response_model=schemas.RestoreOut, tags=["restores"])
    async def get_restore(restore_id: str) -> schemas.RestoreOut:
        async with ctx.db.transaction() as session:
            found = await restores.get(session, restore_id)
        if found is None:
            raise errors.NotFound(f"restore {restore_id!r} does not exist")
        return schemas.RestoreOut.model_validate(found)

    @api.post("/runners/{runner_id}/drain", response_model=schemas.DrainOut, tags=["runners"])
    async def post_drain(runner_id: str) -> schemas.DrainOut:
        async with ctx.db.transaction() as session:
            runner = await fleet.get_runner(session, runner_id)
            if runner is None:
                raise errors.NotFound(f"runner {runner_id!r} is not registered")
            if runner.state != RunnerState.DRAINING:
                await fleet.upsert_runner(
                    session, runner_id=runner.id, api_url=runner.api_url, token=runner.token, now=ctx.now(), state=RunnerState.DRAINING,
                    region=runner.region, capacity=runner.capacity, max_concurrent_backups=runner.max_concurrent_backups,
                )
        logger.info("runner draining", extra={"action": "runner_draining", "runner_id": runner_id})
        await drain.work_drains(ctx)
        return schemas.DrainOut(**vars(await drain.progress(ctx, runner_id)))

    @api.get("/runners/{runner_id}/drain", response_model=schemas.DrainOut, tags=["runners"])
    async def get_drain(runner_id: str) -> schemas.DrainOut:
        return schemas.DrainOut(**vars(await drain.progress(ctx, runner_id)))

    @api.post("/sandboxes/{sandbox_id}/prune", response_model=schemas.PruneOut, tags=["retention"])
    async def post_sandbox_prune(sandbox_id: str, dry_run: Annotated[bool, fastapi.Query(alias="dryRun")] = False) -> schemas.PruneOut:
        return _prune_out(await retention.prune(ctx, sandbox_id=sandbox_id, dry_run=dry_run))

    @api.post("/prune", response_model=schemas.PruneOut, tags=["retention"])
    async def post_prune(dry_run: Annotated[bool, fastapi.Query(alias="dryRun")] = False) -> schemas.PruneOut:
        return _prune_out(await retention.prune(ctx, dry_run=dry_run))

    @api.get("/sandboxes/{sandbox_id}/retention", response_model=schemas.RetentionPolicyIO, tags=["retention"])
    async def get_retention(sandbox_id: str) -> schemas.RetentionPolicyIO:
        policy = retention.policy_for(ctx.settings, await lifecycle.get_sandbox(ctx, sandbox_id))
        return schemas.RetentionPolicyIO(**policy.model_dump())

    @api.put("/sandboxes/{sandbox_id}/retention", response_model=schemas.RetentionPolicyIO, tags=["retention"])
    async def put_retention(sandbox_id: str, body: schemas.RetentionPolicyIO) -> schemas.RetentionPolicyIO:
        overrides = body.model_dump(exclude_none=True)
        text = json.dumps(overrides) if overrides else None
        retention.policy_for(ctx.settings, _PolicyHolder(sandbox_id, text))  # validates before storing
        async with ctx.db.transaction() as session:
            if not await sandboxes.set_retention_policy(session, sandbox_id, text, now=ctx.now()):
                raise errors.NotFound(f"sandbox {sandbox_id!r} is not known to the manager")
        return await get_retention(sandbox_id)

    @api.post("/backups/{backup_id}/verify", response_model=schemas.VerifyOut, tags=["backups"])
    async def post_verify(backup_id: str) -> schemas.VerifyOut:
        outcome = await verification.verify_backup(ctx, backup_id)
        async with ctx.db.transaction() as session:
            backup = await backups.get_backup(session, backup_id)
        return schemas.VerifyOut(outcome=outcome.value, backup=schemas.BackupOut.model_validate(backup))

    @reports.post("/runners/{runner_id}/reports", response_model=schemas.ReportOut, status_code=status.HTTP_202_ACCEPTED, tags=["runners"])
    async def post_report(runner_id: str, body: BackupReport, authorization: Annotated[str | None, fastapi.Header()] = None) -> schemas.ReportOut:
        accepted = await tracking.handle_report(ctx, runner_id, _bearer(authorization), body)
        return schemas.ReportOut(accepted=accepted)

    app.include_router(api)
    app.include_router(reports)
    app.include_router(discovery_routes.create_router(manager))
    return app


class _PolicyHolder:
    def __init__(self, sandbox_id: str, retention_policy: str | None) -> None:
        self.id = sandbox_id
        self.retention_policy = retention_policy


def _prune_out(result: retention.PruneResult) -> schemas.PruneOut:
    entries = [
        schemas.SandboxPruneOut(
            sandbox_id=entry.sandbox_id,
            deleted=list(entry.plan.delete) if entry.plan else [],
            kept={backup_id: list(reasons) for backup_id, reasons in entry.plan.keep.items()} if entry.plan else {},
            error=entry.error,
        )
        for entry in result.sandboxes
    ]
    pruned = sum(len(entry.deleted) for entry in entries) if result.dry_run else result.pruned_count
    return schemas.PruneOut(dry_run=result.dry_run, pruned=pruned, sandboxes=entries)


def _registry_url(body: schemas.RegistryIn) -> str:
    """Return the registry's base URL, rejecting credentials, paths and queries in it."""
    url = body.url
    if url.username or url.password:
        raise errors.InvalidInput("registry url must not contain credentials; send them as username and password")
    if (url.path or "/") != "/" or url.query or url.fragment:
        raise errors.InvalidInput(f"registry url must be a scheme and host only, like https://registry.example.com; remove {url.path}{'?' + url.query if url.query else ''}")
    if body.project is not None and not reference.REPOSITORY_RE.fullmatch(body.project):
        raise errors.InvalidInput(f"registry project {body.project!r} is not a valid repository path: use lowercase letters, digits, '.', '_', '-' and '/'")
    text = f"{url.scheme}://{url.host}" + (f":{url.port}" if url.port else "")
    reference.registry_host(text)
    return text


def _check_id(value: str, what: str) -> None:
    if not ID_RE.fullmatch(value):
        raise errors.InvalidInput(f"{what} {value!r} is invalid: use 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit")


class RejectNulInUrl:
    """ASGI middleware answering 400 to a path or query with a NUL character.

    PostgreSQL cannot store or compare NUL characters in text, so they are refused at the edge.
    Plain ASGI rather than an `@app.middleware("http")` function, which costs every request a
    second task and a copy of the response stream.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and ("\x00" in scope.get("path", "") or b"%00" in scope.get("query_string", b"")):
            message = {"error": {"code": "InvalidInput", "message": "the request path or query contains a NUL character"}}
            await JSONResponse(message, status_code=status.HTTP_400_BAD_REQUEST)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _install_error_handlers(app: fastapi.FastAPI) -> None:
    def body(code: str, message: str) -> dict[str, object]:
        return {"error": {"code": code, "message": message}}

    @app.exception_handler(errors.SandboxBackupError)
    async def on_product_error(request: fastapi.Request, exc: errors.SandboxBackupError) -> JSONResponse:
        code = next((status_code for cls, status_code in ERROR_STATUS.items() if isinstance(exc, cls)), status.HTTP_502_BAD_GATEWAY)
        return JSONResponse(body(type(exc).__name__, str(exc)), status_code=code)

    @app.exception_handler(sa_exc.IntegrityError)
    async def on_integrity_error(request: fastapi.Request, exc: sa_exc.IntegrityError) -> JSONResponse:
        # Two requests created the same row at once; the loser changed nothing.
        logger.info("request lost a race with a concurrent change", extra={"action": "lost_race", "path": request.url.path})
        return JSONResponse(body("Conflict", "a concurrent request changed the same object; send the request again"), status_code=status.HTTP_409_CONFLICT)

    app.add_middleware(RejectNulInUrl)

    @app.exception_handler(fastapi.HTTPException)
    async def on_http_error(request: fastapi.Request, exc: fastapi.HTTPException) -> JSONResponse:
        code = {status.HTTP_401_UNAUTHORIZED: "Unauthorized", status.HTTP_403_FORBIDDEN: "Forbidden"}.get(exc.status_code, "HTTPError")
        return JSONResponse(body(code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: fastapi.Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():
            location = ".".join(str(part) for part in error["loc"] if part != "body")
            problems.append(f"{location}: {error['msg']}")
        return JSONResponse(body("InvalidInput", "invalid request: " + "; ".join(problems)), status_code=422)


def _sandbox_fields(body: schemas.SandboxIn) -> sandboxes.SandboxFields:
    return sandboxes.SandboxFields(
        state=body.state,
        runner_id=body.runner_id,
        organization_id=body.organization_id,
        region=body.region,
        desired_state=body.desired_state,
        ephemeral=body.ephemeral,
    )
