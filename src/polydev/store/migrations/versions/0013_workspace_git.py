"""workspaces from a git repository: the branch asked for, the user's git token (sealed by the vault), and
whether the VM was paused with its memory (a per-user limit on those; past it, only the disk is kept).

Revision ID: 0013
Revises: 0012
"""
import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('workspaces') as batch:
        batch.add_column(sa.Column('branch', sa.String(255), nullable=True))
        batch.add_column(sa.Column('sealed_git_token', sa.Text(), nullable=True))
        batch.add_column(sa.Column('paused_memory', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('workspaces') as batch:
        batch.drop_column('paused_memory')
        batch.drop_column('sealed_git_token')
        batch.drop_column('branch')
