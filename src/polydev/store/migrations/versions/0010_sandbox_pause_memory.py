"""sandboxes.auto_pause_memory: whether a timeout's pause keeps the sandbox's memory or only its disk.

Revision ID: 0010
Revises: 0009
"""
from alembic import op
import sqlalchemy as sa

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('sandboxes') as batch:
        batch.add_column(sa.Column('auto_pause_memory', sa.Boolean(), nullable=False, server_default=sa.true()))


def downgrade() -> None:
    with op.batch_alter_table('sandboxes') as batch:
        batch.drop_column('auto_pause_memory')
