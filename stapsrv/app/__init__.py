"""The running server as a Twisted application: the twistd plugin's options
and service tree, the listener, the publisher, the counters, the log and
the shutdown."""
