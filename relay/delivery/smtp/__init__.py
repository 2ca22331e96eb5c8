"""The upstream SMTP transport: connection pool and channel over aiosmtplib.

An edge: the only package that imports aiosmtplib (besides relay.bench). May import the
pure core and relay.observe.
"""
