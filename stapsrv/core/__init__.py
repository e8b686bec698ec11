"""The sans-IO core: the request stream's framing, the translator command
line and the request members.  No Twisted, no files, no clocks."""
