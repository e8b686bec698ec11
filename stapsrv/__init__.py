"""stapsrv: a SystemTap compile server built on Twisted."""

__version__ = "0.1.0"

#: The compile-server protocol version we speak (the systemtap release we mirror).
PROTOCOL_VERSION = "4.8"
