"""Alembic migrations of the store (SQLite and PostgreSQL alike); applied by :func:`migrate` at start-up."""
