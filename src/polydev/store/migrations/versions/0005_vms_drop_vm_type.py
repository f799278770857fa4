"""vms: drop vm_type, which held the same value as `type` (the VM's purpose: cli or browser).

Revision ID: 0005
Revises: 0004
"""
from alembic import op
import sqlalchemy as sa

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('vms', schema=None) as batch_op:
        batch_op.drop_column('vm_type')


def downgrade() -> None:
    with op.batch_alter_table('vms', schema=None) as batch_op:
        batch_op.add_column(sa.Column('vm_type', sa.String(length=16), nullable=True))
    op.execute("UPDATE vms SET vm_type = type")
