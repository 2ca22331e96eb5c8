"""The queue: its vocabulary (states, message values), what operator operations may do,
which messages an operator means (filters.py), and the interface every store implements.

Pure. Stores live in subpackages (``sqlite/``, ``postgres/``); nothing outside them
opens a connection. What the two stores' SQL shares is written once here, each store
naming its dialect: a filter as WHERE (sqlwhere.py), the columns and their rows as the
queue's types (rows.py), an operator's bulk change in windows (bulk.py).
"""
