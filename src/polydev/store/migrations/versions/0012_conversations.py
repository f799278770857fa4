"""conversations, and runs as turns of them on a workspace (polydev.core.workspaces, core/run_flow.py).

Revision ID: 0012
Revises: 0011
"""
from alembic import op
import sqlalchemy as sa

from polydev.store.models import UTCDateTime

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'conversations',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('user_id', sa.Uuid(), nullable=False),
        sa.Column('workspace_id', sa.Uuid(), nullable=False),
        sa.Column('provider', sa.String(32), nullable=False),
        sa.Column('cli_session', sa.String(200), nullable=True),
        sa.Column('turns', sa.Integer(), nullable=False),
        sa.Column('created_at', UTCDateTime(), nullable=False),
        sa.Column('updated_at', UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['user_id'], ['users.id'], name='fk_conversations_user_id_users',
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['workspace_id'], ['workspaces.id'], name='fk_conversations_workspace_id_workspaces',
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name='pk_conversations'),
    )
    for column in ('user_id', 'workspace_id'):
        op.create_index(f'ix_conversations_{column}', 'conversations', [column])
    with op.batch_alter_table('runs') as batch:
        batch.add_column(sa.Column('workspace_id', sa.Uuid(), nullable=True))
        batch.add_column(sa.Column('conversation_id', sa.Uuid(), nullable=True))
        batch.add_column(sa.Column('turn_key', sa.String(80), nullable=True))
        batch.add_column(sa.Column('changes_json', sa.Text(), nullable=True))
        batch.add_column(sa.Column('patch', sa.Text(), nullable=True))
        batch.create_index('ix_runs_workspace_id', ['workspace_id'])
        batch.create_index('ix_runs_conversation_id', ['conversation_id'])
        batch.create_unique_constraint('uq_runs_turn_key', ['turn_key'])


def downgrade() -> None:
    with op.batch_alter_table('runs') as batch:
        batch.drop_constraint('uq_runs_turn_key', type_='unique')
        batch.drop_index('ix_runs_conversation_id')
        batch.drop_index('ix_runs_workspace_id')
        for column in ('patch', 'changes_json', 'turn_key', 'conversation_id', 'workspace_id'):
            batch.drop_column(column)
    op.drop_table('conversations')
