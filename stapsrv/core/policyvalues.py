"""The values of the client policy's options, parsed: ``--allow`` and
``--proxy-from`` networks, ``--privileges`` levels.  Pure; the checks that
use them are :mod:`stapsrv.compile.policy` and :mod:`stapsrv.app.proxies`."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from stapsrv.core.cmdline import ALL_PRIVILEGES, PRIVILEGE_NAMES

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
