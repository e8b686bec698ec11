"""The ``stap-server`` usage text (its server options' lines come from
``stapsrv.config.options``)."""

from __future__ import annotations

from stapsrv.config.options import MANAGER_OPTIONS

_USAGE = """\
Usage: stap-server {start|stop|restart|condrestart|try-restart|force-reload|status} [options]
Options:
\t-c configfile\t: specify additional global configuration file.
\t-a arch\t\t: specify the target architecture.
\t-r release\t: specify the kernel release (or a kernel build tree).
\t-I path\t\t: specify an additional path to search for tapsets.
\t-R path\t\t: specify the location of the systemtap runtime.
\t-B options\t: specify 'make' options for building systemtap modules.
\t-D name[=value]\t: add a macro definition for building systemtap modules.
\t-u username\t: specify the user who will run the server(s).
\t-i\t\t: one server for every kernel release under /lib/modules.
\t-n nickname\t: a server by nickname; repeat to name several servers.
\t-p pid\t\t: a running server by process id; repeat to name several.
\t-k\t\t: keep the temporary files of each request.
@OPTIONS@\t--json\t\t\t: (status) print the status as one JSON document.

All options may be repeated.  -a, -r, -I, -R, -B, -D, -u and -i describe the
server named by the -n or -p before them (or the one server of the command
line); --log, --port, --ssl, the --max-* options, the policy options
(--sandbox, --allow, --refuse-guru, --privileges), --endpoint, --proxy-from, --metrics,
the timeout, limit, cache and kernel store options are handed to the named
servers in order; servers beyond their count get the default log
(LOG_FILE), a free port, ~/.systemtap/ssl/server and the built-in limits.

With no server named, 'start' starts every server configured in
CONFIG_PATH/*.conf, or one server for the running kernel when none is
configured; 'stop', 'restart' and 'status' act on every running server.
Servers never run as root: name their user with -u, STAP_USER or USER=.
"""


USAGE = _USAGE.replace("@OPTIONS@", "".join(
    f"\t{option.usage}\n" for option in MANAGER_OPTIONS if option.usage))
