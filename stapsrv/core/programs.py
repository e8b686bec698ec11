"""The system programs the server runs its children under, and how long a
process group gets between SIGTERM and SIGKILL.

Every layer that starts a child (the translator, the kernel store's helper
programs, the VM runner) takes these from here, so that they agree."""

from __future__ import annotations

SETPRIV = "/usr/bin/setpriv"
PRLIMIT = "/usr/bin/prlimit"
SETSID = "/usr/bin/setsid"

#: Seconds between SIGTERM and SIGKILL when a child's group must go.
KILL_GRACE = 2.0
