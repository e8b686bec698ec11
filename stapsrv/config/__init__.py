"""A server's settings: the frozen values, the files in 4.8's grammar, and
the one conversion from options or files to a ``ServerConfig``."""
