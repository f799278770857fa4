"""servers: the deployment's server processes (one row per start), their internal URL, heartbeat and
capacity; vms, auth_sessions and runs record the server that hosts them.

Revision ID: 0008
Revises: 0007
"""
from alembic import op
import sqlalchemy as sa

from polydev.store.models import UTCDateTime

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

HOSTED = ('vms', 'auth_sessions', 'runs')


def upgrade() -> None:
    op.create_table(
        'servers',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('url', sa.String(length=255), nullable=False),
        sa.Column('instance', sa.String(length=128), nullable=False),
        sa.Column('vcpus', sa.Integer(), nullable=False),
        sa.Column('memory_mb', sa.Integer(), nullable=False),
        sa.Column('runs_vms', sa.Boolean(), nullable=False),
        sa.Column('started_at', UTCDateTime(), nullable=False),
        sa.Column('heartbeat_at', UTCDateTime(), nullable=False),
        sa.Column('stopped_at', UTCDateTime(), nullable=True),
        sa.Column('reaped_by', sa.Uuid(), nullable=True),
        sa.Column('reaped_at', UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_servers')),
    )
    op.create_index(op.f('ix_servers_instance'), 'servers', ['instance'])
    for table in HOSTED:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column('server_id', sa.Uuid(), nullable=True))
            batch.create_index(batch.f(f'ix_{table}_server_id'), ['server_id'])


def downgrade() -> None:
    for table in HOSTED:
        with op.batch_alter_table(table) as batch:
            batch.drop_index(batch.f(f'ix_{table}_server_id'))
            batch.drop_column('server_id')
    op.drop_index(op.f('ix_servers_instance'), table_name='servers')
    op.drop_table('servers')
