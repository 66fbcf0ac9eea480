"""PENDING attempts carry the runner of their sandbox

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05

Dispatch now reads PENDING attempts by (state, runner_id) for the runners with a free slot, so a
PENDING attempt records the runner its sandbox is on. Attempts queued before this revision have
no runner yet; they get their sandbox's.
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "UPDATE backups SET runner_id = (SELECT sandboxes.runner_id FROM sandboxes WHERE sandboxes.id = backups.sandbox_id) "
        "WHERE state = 'PENDING'"
    )


def downgrade() -> None:
    op.execute("UPDATE backups SET runner_id = NULL WHERE state = 'PENDING'")
