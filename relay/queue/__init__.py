"""The queue: its vocabulary (states, message values), what operator operations may do,
which messages an operator means (filters.py), and the interface every store implements.

Pure. Stores live in subpackages (``sqlite/``, ``postgres/``); nothing outside them
touches SQL.
"""
