"""Project registry tables (``federation/_registry.py``): projects and their events.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

A database whose tables were already created by ``Registry(url)`` itself (it runs
``create_all`` on start) is at this revision: mark it with ``alembic stamp 0002``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bulle_projects",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("title", sa.String(length=300), nullable=False),
        sa.Column("purpose", sa.Text(), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("team", sa.Text(), nullable=False),
        sa.Column("datasets", sa.Text(), nullable=False),
        sa.Column("epsilon", sa.Double(), nullable=False),
        sa.Column("delta", sa.Double(), nullable=False),
        sa.Column("duration_days", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("submitted_at", sa.String(length=40), nullable=False),
        sa.Column("decided_at", sa.String(length=40), nullable=True),
        sa.Column("decided_by", sa.String(length=200), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("granted_datasets", sa.Text(), nullable=True),
        sa.Column("granted_epsilon", sa.Double(), nullable=True),
        sa.Column("granted_delta", sa.Double(), nullable=True),
        sa.Column("expires_at", sa.String(length=40), nullable=True),
        sa.Column("grant_token", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "bulle_project_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("project", sa.String(length=64), nullable=False),
        sa.Column("time", sa.String(length=40), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=20), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["project"], ["bulle_projects.name"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_bulle_project_events_project", "bulle_project_events", ["project"])


def downgrade() -> None:
    op.drop_index("ix_bulle_project_events_project", table_name="bulle_project_events")
    op.drop_table("bulle_project_events")
    op.drop_table("bulle_projects")
