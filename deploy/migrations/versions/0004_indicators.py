"""Standing indicators (``federation/_indicators.py``, issue 17): the indicators researchers
proposed (each carried by a registry project the board decides) and every refresh the
coordinator ran, released, refused or failed.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05

A database whose tables were already created by the coordinator itself (it runs
``create_all`` on start) is at this revision: mark it with ``alembic stamp 0004``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bulle_indicators",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("title", sa.String(length=300), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("sql", sa.Text(), nullable=False),
        sa.Column("schedule", sa.String(length=20), nullable=False),
        sa.Column("interval_s", sa.Integer(), nullable=False),
        sa.Column("epsilon", sa.Double(), nullable=True),
        sa.Column("tier", sa.String(length=20), nullable=False),
        sa.Column("audience", sa.Text(), nullable=False),
        sa.Column("value_column", sa.String(length=200), nullable=True),
        sa.Column("project", sa.String(length=64), nullable=False),
        sa.Column("proposer", sa.String(length=200), nullable=False),
        sa.Column("proposed_at", sa.String(length=40), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "bulle_indicator_refreshes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("indicator", sa.String(length=64), nullable=False),
        sa.Column("started_at", sa.String(length=40), nullable=False),
        sa.Column("finished_at", sa.String(length=40), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("query_id", sa.String(length=64), nullable=True),
        sa.Column("epsilon_charged", sa.Double(), nullable=False),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("error_code", sa.String(length=40), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("receipt", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_bulle_indicator_refreshes_indicator", "bulle_indicator_refreshes",
                    ["indicator", "id"])


def downgrade() -> None:
    op.drop_index("ix_bulle_indicator_refreshes_indicator",
                  table_name="bulle_indicator_refreshes")
    op.drop_table("bulle_indicator_refreshes")
    op.drop_table("bulle_indicators")
