"""The administrator's policy for clients, which 4.8 leaves to firewalls:
which networks may connect (``--allow``), whether guru mode is compiled
(``--refuse-guru``) and for which privilege levels (``--privileges``).

Pure checks; the server answers a refused client with the message given
here, in the form its stap prints.  The defaults accept everything, as 4.8.
"""

from __future__ import annotations

from collections.abc import Sequence

from attrs import frozen

from stapsrv.core.cmdline import ALL_PRIVILEGES, Privilege, guru_mode
from stapsrv.core.policyvalues import (
    Network,
    PolicyError,
    in_networks,
    parse_networks,
    parse_privileges,
)

__all__ = ["Network", "Policy", "PolicyError", "in_networks", "parse_networks",
           "parse_privileges"]


@frozen
class Policy:
    allow: tuple[Network, ...] = ()
    refuse_guru: bool = False
    privileges: tuple[str, ...] = ALL_PRIVILEGES

    @classmethod
    def from_values(cls, allow: Sequence[str], refuse_guru: bool,
                    privileges: Sequence[str]) -> Policy:
        return cls(parse_networks(allow), refuse_guru,
                   parse_privileges(",".join(privileges)))

    def admits(self, host: str) -> bool:
        """Whether a client at ``host`` may use the server (an IPv4 address
        seen through an IPv6 socket counts as the IPv4 address)."""
        return not self.allow or in_networks(host, self.allow)

    def peer_refusal(self, host: str) -> str:
        return (f"Server: This server does not accept requests from {host} "
                "(its --allow list).")

    def request_refusal(self, arguments: Sequence[str], privilege: Privilege) -> str | None:
        """Why the server will not compile a request, or None."""
        if self.refuse_guru and guru_mode(arguments):
            return "Server: This server does not compile guru mode (-g) scripts."
        name = privilege.name.lower()
        if name not in self.privileges:
            return (f"Server: This server does not compile for privilege level {name}; "
                    f"it accepts {', '.join(self.privileges)} (its --privileges).")
        return None
