"""Alembic script directory of the store; :func:`trioproxy.store.engine.migrate` runs it.

To add a migration, copy ``versions/v0001_initial.py`` to the next number, set
``revision``/``down_revision``, and write ``upgrade()`` with ``alembic.op`` (use
``op.batch_alter_table`` for column changes: SQLite cannot ALTER most things in place).
Update ``trioproxy/store/schema.py`` to match; a test compares the two.
"""
