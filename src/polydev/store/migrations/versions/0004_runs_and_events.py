"""Provider flows: runs gain live_key (one live run per stored credential), timeout, credential kind,
refresh flag, usage and result; run_events keeps every normalized event; auth_sessions gain method.

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa

from polydev.store.models import UTCDateTime

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('live_key', sa.String(length=80), nullable=True))
        batch_op.add_column(sa.Column('timeout_seconds', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('credential_kind', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('credential_refreshed', sa.Boolean(), nullable=False,
                                      server_default=sa.false()))
        batch_op.add_column(sa.Column('usage_json', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('result_text', sa.Text(), nullable=True))
        batch_op.create_unique_constraint(batch_op.f('uq_runs_live_key'), ['live_key'])
    with op.batch_alter_table('auth_sessions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('method', sa.String(length=16), nullable=True))
    op.create_table(
        'run_events',
        sa.Column('run_id', sa.Uuid(), nullable=False),
        sa.Column('seq', sa.Integer(), nullable=False),
        sa.Column('type', sa.String(length=16), nullable=False),
        sa.Column('data', sa.Text(), nullable=False),
        sa.Column('created_at', UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_run_events_run_id_runs'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('run_id', 'seq', name=op.f('pk_run_events')),
    )


def downgrade() -> None:
    op.drop_table('run_events')
    with op.batch_alter_table('auth_sessions', schema=None) as batch_op:
        batch_op.drop_column('method')
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_runs_live_key'), type_='unique')
        for column in ('result_text', 'usage_json', 'credential_refreshed', 'credential_kind',
                       'timeout_seconds', 'live_key'):
            batch_op.drop_column(column)
