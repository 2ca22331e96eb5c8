"""Several relay processes on one host: the supervising parent of `relay serve --workers N`.

Like uvicorn's ``supervisors/``: the parent runs no listener and no delivery itself; it
starts the workers (each a `relay serve` on the same port and queue file), restarts one
that dies, and forwards SIGTERM and SIGHUP. Entry layer: it may import anything below.
"""
