"""The `relay` command line: one module per command group.

Entry point: may import anything except relay.bench, which `relay bench` loads only when
it runs (`relay serve` never imports it).
"""

from relay.cli import hangup

hangup.hold()  # before the slow imports below (see relay.cli.hangup)

from relay.cli.commands import main  # noqa: E402

__all__ = ["main"]
