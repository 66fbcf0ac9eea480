"""restores, retention policy, backup verification columns

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("backups", schema=None) as batch_op:
        batch_op.add_column(sa.Column("broken_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("broken_reason", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("layer_count", sa.Integer(), nullable=True))

    with op.batch_alter_table("sandboxes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("retention_policy", sa.Text(), nullable=True))

    with op.batch_alter_table("runners", schema=None) as batch_op:
        batch_op.add_column(sa.Column("drain_started_at", sa.DateTime(timezone=True), nullable=True))

    op.create_table(
        "restores",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("sandbox_id", sa.String(length=128), nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("requested_backup_id", sa.String(length=36), nullable=True),
        sa.Column("requested_runner_id", sa.String(length=128), nullable=True),
        sa.Column("backup_id", sa.String(length=36), nullable=True),
        sa.Column("runner_id", sa.String(length=128), nullable=True),
        sa.Column("previous_runner_id", sa.String(length=128), nullable=True),
        sa.Column("target_sandbox_id", sa.String(length=128), nullable=False),
        sa.Column("registry_attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("error_reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["sandbox_id"], ["sandboxes.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("restores", schema=None) as batch_op:
        batch_op.create_index("ix_restores_sandbox_id", ["sandbox_id"], unique=False)
        batch_op.create_index("ix_restores_state", ["state"], unique=False)
        open_restore = "state IN ('PENDING', 'RUNNING') AND purpose != 'DRILL'"
        open_drill = "state IN ('PENDING', 'RUNNING') AND purpose = 'DRILL'"
        batch_op.create_index("uq_restores_one_open", ["sandbox_id"], unique=True, sqlite_where=sa.text(open_restore), postgresql_where=sa.text(open_restore))
        batch_op.create_index("uq_restores_one_open_drill", ["sandbox_id"], unique=True, sqlite_where=sa.text(open_drill), postgresql_where=sa.text(open_drill))


def downgrade() -> None:
    with op.batch_alter_table("restores", schema=None) as batch_op:
        batch_op.drop_index("uq_restores_one_open_drill")
        batch_op.drop_index("uq_restores_one_open")
        batch_op.drop_index("ix_restores_state")
        batch_op.drop_index("ix_restores_sandbox_id")
    op.drop_table("restores")
    with op.batch_alter_table("runners", schema=None) as batch_op:
        batch_op.drop_column("drain_started_at")
    with op.batch_alter_table("sandboxes", schema=None) as batch_op:
        batch_op.drop_column("retention_policy")
    with op.batch_alter_table("backups", schema=None) as batch_op:
        batch_op.drop_column("layer_count")
        batch_op.drop_column("broken_reason")
        batch_op.drop_column("broken_at")
