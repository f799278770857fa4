"""workspaces: projects the CLIs work on across turns (polydev.core.workspaces).

Revision ID: 0011
Revises: 0010
"""
from alembic import op
import sqlalchemy as sa

from polydev.store.models import UTCDateTime

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'workspaces',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('user_id', sa.Uuid(), nullable=False),
        sa.Column('name', sa.String(100), nullable=False),
        sa.Column('source', sa.String(16), nullable=False),
        sa.Column('repo_url', sa.Text(), nullable=True),
        sa.Column('state', sa.String(16), nullable=False),
        sa.Column('vm_id', sa.Uuid(), nullable=True),
        sa.Column('size_bytes', sa.BigInteger(), nullable=False),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('sealed_agent', sa.Text(), nullable=True),
        sa.Column('created_at', UTCDateTime(), nullable=False),
        sa.Column('used_at', UTCDateTime(), nullable=False),
        sa.Column('deleted_at', UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(['user_id'], ['users.id'], name='fk_workspaces_user_id_users', ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name='pk_workspaces'),
    )
    for column in ('user_id', 'state', 'vm_id'):
        op.create_index(f'ix_workspaces_{column}', 'workspaces', [column])


def downgrade() -> None:
    op.drop_table('workspaces')
