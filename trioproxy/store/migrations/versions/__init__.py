"""Migration scripts, oldest first (``v0001_...``); Alembic loads them by path."""
