"""sandboxes: E2B-compatible sandboxes (polydev.core.sandboxes).

Revision ID: 0009
Revises: 0008
"""
from alembic import op
import sqlalchemy as sa

from polydev.store.models import UTCDateTime

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'sandboxes',
        sa.Column('id', sa.String(32), nullable=False),
        sa.Column('user_id', sa.Uuid(), nullable=False),
        sa.Column('vm_id', sa.Uuid(), nullable=True),
        sa.Column('template', sa.String(64), nullable=False),
        sa.Column('state', sa.String(16), nullable=False),
        sa.Column('metadata_json', sa.Text(), nullable=False),
        sa.Column('token_hash', sa.String(64), nullable=False),
        sa.Column('sealed', sa.Text(), nullable=False),
        sa.Column('cpu_count', sa.Integer(), nullable=False),
        sa.Column('memory_mb', sa.Integer(), nullable=False),
        sa.Column('auto_pause', sa.Boolean(), nullable=False),
        sa.Column('internet', sa.Boolean(), nullable=False),
        sa.Column('started_at', UTCDateTime(), nullable=False),
        sa.Column('end_at', UTCDateTime(), nullable=False),
        sa.Column('ended_at', UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(['user_id'], ['users.id'], name='fk_sandboxes_user_id_users', ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name='pk_sandboxes'),
    )
    for column in ('user_id', 'vm_id', 'state', 'end_at'):
        op.create_index(f'ix_sandboxes_{column}', 'sandboxes', [column])


def downgrade() -> None:
    op.drop_table('sandboxes')
