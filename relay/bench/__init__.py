"""`relay bench`: orchestration, its sinks, load generator and private Postfix instance.

Never imported by `relay serve`: relay.cli.commands loads it only for the bench command.
"""
