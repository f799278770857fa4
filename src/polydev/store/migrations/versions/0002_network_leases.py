"""Network slot leases.

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa

from polydev.store.models import UTCDateTime

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'network_leases',
        sa.Column('slot_index', sa.Integer(), autoincrement=False, nullable=False),
        sa.Column('vm_id', sa.Uuid(), nullable=False),
        sa.Column('host_ip', sa.String(length=64), nullable=False),
        sa.Column('leased_at', UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('slot_index', name=op.f('pk_network_leases')),
        sa.UniqueConstraint('vm_id', name=op.f('uq_network_leases_vm_id')),
    )


def downgrade() -> None:
    op.drop_table('network_leases')
