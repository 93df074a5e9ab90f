"""Privacy ledger tables (``privacy/_ledger.py``): budgets and charges.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

A database whose tables were already created by ``Ledger(url)`` itself (it runs
``create_all`` on start) is at this revision: mark it with ``alembic stamp 0001``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "privacy_budgets",
        sa.Column("project", sa.String(length=200), nullable=False),
        sa.Column("scope", sa.String(length=200), nullable=False),
        sa.Column("epsilon_cap", sa.Double(), nullable=False),
        sa.Column("delta", sa.Double(), nullable=False),
        sa.Column("rdp", sa.Text(), nullable=False),
        sa.Column("n_orders", sa.Integer(), nullable=False),
        sa.Column("spent_epsilon", sa.Double(), nullable=False),
        sa.Column("n_charges", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.String(length=40), nullable=False),
        sa.PrimaryKeyConstraint("project", "scope"),
    )
    op.create_table(
        "privacy_charges",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(length=200), nullable=False),
        sa.Column("project", sa.String(length=200), nullable=False),
        sa.Column("scope", sa.String(length=200), nullable=False),
        sa.Column("event", sa.Text(), nullable=False),
        sa.Column("epsilon_claim", sa.Double(), nullable=True),
        sa.Column("accepted", sa.Boolean(), nullable=False),
        sa.Column("spent_epsilon", sa.Double(), nullable=False),
        sa.Column("remaining_epsilon", sa.Double(), nullable=False),
        sa.Column("needed_epsilon", sa.Double(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.String(length=40), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_id"),
    )
    op.create_index("ix_privacy_charges_project_scope", "privacy_charges",
                    ["project", "scope"])


def downgrade() -> None:
    op.drop_index("ix_privacy_charges_project_scope", table_name="privacy_charges")
    op.drop_table("privacy_charges")
    op.drop_table("privacy_budgets")
