"""egress: per-user egress identities and the gateway's accounting.

Revision ID: 0006
Revises: 0005
"""
from alembic import op
import sqlalchemy as sa

from polydev.store.models import UTCDateTime

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'egress_identities',
        sa.Column('user_id', sa.Uuid(), nullable=False),
        sa.Column('mode', sa.String(length=16), nullable=False),
        sa.Column('address', sa.String(length=64), nullable=True),
        sa.Column('limits_json', sa.Text(), nullable=True),
        sa.Column('updated_at', UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_egress_identities_user_id_users'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('user_id', name=op.f('pk_egress_identities')),
        sa.UniqueConstraint('address', name=op.f('uq_egress_identities_address')),
    )
    op.create_table(
        'egress_usage',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('user_id', sa.Uuid(), nullable=True),
        sa.Column('host', sa.String(length=255), nullable=False),
        sa.Column('day', sa.String(length=10), nullable=False),
        sa.Column('connections', sa.Integer(), nullable=False),
        sa.Column('bytes_up', sa.BigInteger(), nullable=False),
        sa.Column('bytes_down', sa.BigInteger(), nullable=False),
        sa.Column('refusals', sa.Integer(), nullable=False),
        sa.Column('last_refusal', sa.Text(), nullable=True),
        sa.Column('first_seen', UTCDateTime(), nullable=False),
        sa.Column('last_seen', UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_egress_usage_user_id_users'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_egress_usage')),
        sa.UniqueConstraint('user_id', 'host', 'day', name='uq_egress_usage_user_host_day'),
    )
    op.create_index(op.f('ix_egress_usage_user_id'), 'egress_usage', ['user_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_egress_usage_user_id'), table_name='egress_usage')
    op.drop_table('egress_usage')
    op.drop_table('egress_identities')
