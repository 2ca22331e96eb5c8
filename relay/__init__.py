"""relay: a local SMTP relay for applications."""

__version__ = "0.1.0"
