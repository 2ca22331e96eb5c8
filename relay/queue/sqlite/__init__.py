"""The SQLite queue store: schema.py (file, schema, row mapping), writer.py (one batch's
statements), store.py (SQLiteStore: lifecycle, writer task, scheduler's side), admin.py
(operator queries), filters.py (an operator's MessageFilter as a WHERE clause) and
prune.py (keeping the file bounded).

An edge: the only package that imports sqlite3 or aiosqlite. May import relay.queue,
relay.errors and relay.observe.
"""
