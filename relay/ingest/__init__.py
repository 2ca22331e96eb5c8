"""The SMTP listener: the aiosmtpd server and handler, session limits, address checks,
listener AUTH and failed-login throttling.

An edge: the only package that imports aiosmtpd (besides relay.bench). May import the
pure core (relay.smtp, relay.config, relay.queue's types and interface), relay.observe.
"""
