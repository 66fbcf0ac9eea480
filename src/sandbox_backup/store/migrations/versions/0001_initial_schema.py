"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('registries',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('url', sa.String(length=1024), nullable=False),
    sa.Column('project', sa.String(length=255), nullable=True),
    sa.Column('username', sa.String(length=255), nullable=True),
    sa.Column('password', sa.String(length=1024), nullable=True),
    sa.Column('region', sa.String(length=128), nullable=True),
    sa.Column('organization_id', sa.String(length=128), nullable=True),
    sa.Column('is_default', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('runners',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('api_url', sa.String(length=1024), nullable=False),
    sa.Column('token', sa.String(length=1024), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('region', sa.String(length=128), nullable=True),
    sa.Column('capacity', sa.Integer(), nullable=False),
    sa.Column('max_concurrent_backups', sa.Integer(), nullable=True),
    sa.Column('failed_probes', sa.Integer(), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('cleanup_tasks',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('sandbox_id', sa.String(length=128), nullable=False),
    sa.Column('registry_id', sa.String(length=128), nullable=False),
    sa.Column('repository', sa.String(length=1024), nullable=False),
    sa.Column('digest', sa.String(length=128), nullable=True),
    sa.Column('not_before', sa.DateTime(timezone=True), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('done_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['registry_id'], ['registries.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('cleanup_tasks', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_cleanup_tasks_done_at'), ['done_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_cleanup_tasks_sandbox_id'), ['sandbox_id'], unique=False)

    op.create_table('sandboxes',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('organization_id', sa.String(length=128), nullable=True),
    sa.Column('runner_id', sa.String(length=128), nullable=True),
    sa.Column('region', sa.String(length=128), nullable=True),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('desired_state', sa.String(length=32), nullable=True),
    sa.Column('state_changed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('backup_state', sa.String(length=32), nullable=False),
    sa.Column('current_backup_id', sa.String(length=36), nullable=True),
    sa.Column('backup_registry_id', sa.String(length=128), nullable=True),
    sa.Column('last_backup_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_backup_started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_attempt_ended_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('error_reason', sa.Text(), nullable=True),
    sa.Column('ephemeral', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['backup_registry_id'], ['registries.id'], ),
    sa.ForeignKeyConstraint(['runner_id'], ['runners.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('sandboxes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_sandboxes_backup_state'), ['backup_state'], unique=False)
        batch_op.create_index(batch_op.f('ix_sandboxes_runner_id'), ['runner_id'], unique=False)
        batch_op.create_index('ix_sandboxes_state_runner', ['state', 'runner_id'], unique=False)

    op.create_table('backups',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('sandbox_id', sa.String(length=128), nullable=False),
    sa.Column('runner_id', sa.String(length=128), nullable=True),
    sa.Column('registry_id', sa.String(length=128), nullable=False),
    sa.Column('image_ref', sa.String(length=1024), nullable=False),
    sa.Column('trigger', sa.String(length=32), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('manifest_digest', sa.String(length=128), nullable=True),
    sa.Column('size_bytes', sa.BigInteger(), nullable=True),
    sa.Column('error_reason', sa.Text(), nullable=True),
    sa.Column('error_transient', sa.Boolean(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('accepted_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('checked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('verified_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['registry_id'], ['registries.id'], ),
    sa.ForeignKeyConstraint(['sandbox_id'], ['sandboxes.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('backups', schema=None) as batch_op:
        batch_op.create_index('ix_backups_sandbox_created', ['sandbox_id', 'created_at'], unique=False)
        batch_op.create_index('ix_backups_state_runner', ['state', 'runner_id'], unique=False)
        batch_op.create_index('ix_backups_state_next_attempt', ['state', 'next_attempt_at'], unique=False)
        batch_op.create_index('uq_backups_one_in_flight', ['sandbox_id'], unique=True, sqlite_where=sa.text("state IN ('PENDING', 'IN_PROGRESS')"), postgresql_where=sa.text("state IN ('PENDING', 'IN_PROGRESS')"))



def downgrade() -> None:
    with op.batch_alter_table('backups', schema=None) as batch_op:
        batch_op.drop_index('uq_backups_one_in_flight', sqlite_where=sa.text("state IN ('PENDING', 'IN_PROGRESS')"), postgresql_where=sa.text("state IN ('PENDING', 'IN_PROGRESS')"))
        batch_op.drop_index('ix_backups_state_next_attempt')
        batch_op.drop_index('ix_backups_state_runner')
        batch_op.drop_index('ix_backups_sandbox_created')

    op.drop_table('backups')
    with op.batch_alter_table('sandboxes', schema=None) as batch_op:
        batch_op.drop_index('ix_sandboxes_state_runner')
        batch_op.drop_index(batch_op.f('ix_sandboxes_runner_id'))
        batch_op.drop_index(batch_op.f('ix_sandboxes_backup_state'))

    op.drop_table('sandboxes')
    with op.batch_alter_table('cleanup_tasks', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_cleanup_tasks_sandbox_id'))
        batch_op.drop_index(batch_op.f('ix_cleanup_tasks_done_at'))

    op.drop_table('cleanup_tasks')
    op.drop_table('runners')
    op.drop_table('registries')
