"""Command lines for administrators: the ``stap-server`` manager, its
arguments, the daemons it launches, and the small admin commands."""
