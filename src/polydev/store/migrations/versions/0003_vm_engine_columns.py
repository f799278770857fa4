"""VM engine columns: backend_pid (was firecracker_pid), backend, workdir, agent_port, slot_index,
expires_at, error_message.

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa

from polydev.store.models import UTCDateTime

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('vms', schema=None) as batch_op:
        batch_op.alter_column('firecracker_pid', new_column_name='backend_pid', existing_type=sa.Integer(),
                              existing_nullable=True)
        batch_op.add_column(sa.Column('backend', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('workdir', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('agent_port', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('slot_index', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('expires_at', UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column('error_message', sa.Text(), nullable=True))
        batch_op.create_index(batch_op.f('ix_vms_expires_at'), ['expires_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('vms', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_vms_expires_at'))
        for column in ('error_message', 'expires_at', 'slot_index', 'agent_port', 'workdir', 'backend'):
            batch_op.drop_column(column)
        batch_op.alter_column('backend_pid', new_column_name='firecracker_pid', existing_type=sa.Integer(),
                              existing_nullable=True)
