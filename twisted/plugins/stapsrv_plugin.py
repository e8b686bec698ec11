# The twistd plugin for stapsrv.  Keep this file free of imports beyond
# ServiceMaker: twistd loads every plugin file to list them.
from twisted.application.service import ServiceMaker

stapServer = ServiceMaker(
    "stap-server",
    "stapsrv.app.tap",
    "SystemTap compile server (wire-compatible with stap-serverd 4.8)",
    "stap-server",
)
