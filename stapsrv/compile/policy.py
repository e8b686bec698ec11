"""The administrator's policy for clients, which 4.8 leaves to firewalls:
which networks may connect (``--allow``), whether guru mode is compiled
(``--refuse-guru``) and for which privilege levels (``--privileges``).

Pure checks; the server answers a refused client with the message given
here, in the form its stap prints.  The defaults accept everything, as 4.8.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from attrs import frozen

from stapsrv.core.cmdline import ALL_PRIVILEGES, PRIVILEGE_NAMES, Privilege, guru_mode

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class PolicyError(ValueError):
    """A policy value that does not parse; the message names it."""


def parse_networks(values: Iterable[str], option: str = "--allow") -> tuple[Network, ...]:
    """Values of ``option`` (``--allow``, ``--proxy-from``): addresses or
    CIDR networks, IPv4 or IPv6."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise PolicyError(f"{option} {value}: not an address or network "
                              "(for example 192.0.2.0/24 or 2001:db8::/32)") from None
    return tuple(networks)


def in_networks(host: str, networks: Iterable[Network]) -> bool:
    """Whether the address ``host`` is in one of ``networks`` (an IPv4
    address seen through an IPv6 socket counts as the IPv4 address; a
    zone index is ignored; what is not an address is in none)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def parse_privileges(value: str) -> tuple[str, ...]:
    """``--privileges``: a comma-separated list of stapusr, stapsys, stapdev."""
    names = tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
    unknown = [name for name in names if name not in PRIVILEGE_NAMES]
    if unknown or not names:
        raise PolicyError(f"--privileges {value}: give one or more of "
                          f"{', '.join(ALL_PRIVILEGES)}, separated by commas")
    return tuple(name for name in ALL_PRIVILEGES if name in names)


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
