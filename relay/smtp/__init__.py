"""SMTP as bytes and text, pure: the wire format, the DATA reader, replies, headers.

No sockets, no event loop. May import relay.errors and the standard library only.
"""
