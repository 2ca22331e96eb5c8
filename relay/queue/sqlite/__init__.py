"""The SQLite queue store: schema, the batching writer, queries, operator operations.

An edge: the only package that imports sqlite3 or aiosqlite. May import relay.queue,
relay.errors and relay.observe.
"""
