"""Node registry table (``federation/_noderegistry.py``): the nodes added to or removed from
the federation with ``bulle coordinator nodes``, on top of the config's ``[[node]]`` list.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05

A database whose table was already created by the coordinator itself (it runs
``create_all`` on start) is at this revision: mark it with ``alembic stamp 0003``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bulle_nodes",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("address", sa.String(length=300), nullable=False),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("changed_at", sa.String(length=40), nullable=False),
        sa.Column("changed_by", sa.String(length=200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("bulle_nodes")
