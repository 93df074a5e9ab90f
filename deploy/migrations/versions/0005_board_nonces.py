"""Board request nonces (``federation/_boardauth.py``): each board-signed request's nonce
until it expires, so a replay is refused across restarts and replicas.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06

A database whose table was already created by the coordinator itself (it runs
``create_all`` on start) is at this revision: mark it with ``alembic stamp 0005``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bulle_board_nonces",
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column("expires", sa.String(length=40), nullable=False),
        sa.PrimaryKeyConstraint("nonce"),
    )


def downgrade() -> None:
    op.drop_table("bulle_board_nonces")
