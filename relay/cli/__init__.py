"""The `relay` command line: one module per command group.

Entry point: may import anything except relay.bench, which `relay bench` loads only when
it runs (`relay serve` never imports it).
"""

from relay.cli.commands import main

__all__ = ["main"]
