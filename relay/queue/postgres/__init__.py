"""The PostgreSQL queue store, shared by relays on several hosts: schema.py (numbered
migrations, row mapping, the claim statement), store.py (PostgresStore: pool, claims,
outcomes, shared state, wake-ups), admin.py (operator queries) and filters.py (an
operator's MessageFilter as a WHERE clause).

An edge: the only package that imports psycopg. May import relay.queue, relay.errors and
relay.observe.
"""
