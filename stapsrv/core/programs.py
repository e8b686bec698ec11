"""The system programs the server runs its children under, and how long a
process group gets between SIGTERM and SIGKILL.

Every layer that starts a child (the translator, the kernel store's helper
programs, the VM runner) takes these from here, so that they agree."""

from __future__ import annotations

SETPRIV = "/usr/bin/setpriv"
PRLIMIT = "/usr/bin/prlimit"
SETSID = "/usr/bin/setsid"
NICE = "/usr/bin/nice"

#: Seconds between SIGTERM and SIGKILL when a child's group must go.
KILL_GRACE = 2.0
#: How much lower the CPU priority of kernel store work (apt, dpkg-deb,
#: System.map passes) and warm-up compiles is than clients' compiles: the
#: work one client can make the server do for a new release yields to the
#: compiles the others wait for.
STORE_NICENESS = 10
