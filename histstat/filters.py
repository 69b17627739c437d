"""Row filters: parsing the analyst's lists, and deciding which new rows to keep."""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Union

import psutil

from histstat.addresses import parse_ip, unmapped
from histstat.containers import MIN_PREFIX, ContainerFilter
from histstat.records import Connection, ProcessFacts

# NONE stands for stateless (UDP) rows, whose status is shown as "-" / null.
STATUSES = tuple(sorted(getattr(psutil, name) for name in dir(psutil) if name.startswith("CONN_")))
_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")

PortRange = tuple[int, int]  # first and last port, both included
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class FilterValueError(ValueError):
    """A malformed filter value; the message names it (and the valid choices)."""


def _items(text: str, what: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise FilterValueError(f"empty item in {what} list {text!r}")
    return items


def _is_number(text: str) -> bool:
    """ASCII digits only (str.isdigit() also takes '²', which int() refuses, and int()
    takes '١' and '1_0'), and few enough for int() to read (it refuses 4,300)."""
    return text.isascii() and text.isdigit() and len(text.lstrip("0")) <= 20


def _port_range(item: str) -> PortRange:
    low, dash, high = (part.strip() for part in item.partition("-"))
    high = high if dash else low
    if not (_is_number(low) and _is_number(high)) or max(int(low), int(high)) > 65535:
        raise FilterValueError(f"not a port or port range (0-65535): {item!r}")
    if int(high) < int(low):
        raise FilterValueError(f"port range runs backwards: {item!r}")
    return (int(low), int(high))


def parse_ports(text: str) -> tuple[PortRange, ...]:
    """``22,80,8000-8100`` → ((22, 22), (80, 80), (8000, 8100))."""
    return tuple(_port_range(item) for item in _items(text, "port"))


def _unmapped(network: Network) -> Network:
    """An IPv4-mapped IPv6 network (``::ffff:10.0.0.0/104``) as its IPv4 network."""
    if network.version == 6 and network.subnet_of(_V4_MAPPED):
        address = network.network_address.ipv4_mapped
        return ipaddress.ip_network(f"{address}/{network.prefixlen - 96}")
    return network


def parse_networks(text: str) -> tuple[Network, ...]:
    """IP addresses and CIDR networks, IPv4 or IPv6 (host bits allowed: ``10.1.2.3/8``)."""
    networks = []
    for item in _items(text, "address"):
        try:
            networks.append(_unmapped(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise FilterValueError(f"not an IP address or network: {item!r}") from None
    return tuple(networks)


def parse_pids(text: str) -> frozenset[int]:
    pids = set()
    for item in _items(text, "pid"):
        if not _is_number(item):
            raise FilterValueError(f"not a pid: {item!r}")
        pids.add(int(item))
    return frozenset(pids)


# A namespace inode as readlink /proc/PID/ns/net writes it, or alone: the kernel numbers
# namespaces with 32 bits.
_NAMESPACE = re.compile(r"(?:net:\[)?([0-9]{1,10})\]?")


def parse_namespaces(text: str) -> frozenset[int]:
    """Network namespace inode numbers: ``4026531840`` or ``net:[4026531840]``."""
    found = set()
    for item in _items(text, "namespace"):
        match = _NAMESPACE.fullmatch(item)
        if match is None or (item.startswith("net:[") != item.endswith("]")):
            raise FilterValueError(f"not a network namespace inode number: {item!r}")
        inode = int(match.group(1))
        if not 0 < inode < 2**32:
            raise FilterValueError(f"not a network namespace inode number: {item!r}")
        found.add(inode)
    return frozenset(found)


# What histstat.containers gives: a runtime's 64 hex digits, or a machine's name.
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX = re.compile(r"[0-9a-f]+")


def parse_containers(text: str) -> tuple[str, ...]:
    """Container ids, or prefixes of at least MIN_PREFIX characters (Docker's short
    id). A shorter value of hex digits alone is a cut id that could name many
    containers, and is refused; any other is a machine's name (systemd-nspawn), which
    only matches whole."""
    values = []
    for item in _items(text, "container"):
        if not _CONTAINER_ID.fullmatch(item):
            raise FilterValueError(f"not a container id or machine name: {item!r}")
        if _HEX.fullmatch(item.lower()):
            if len(item) < MIN_PREFIX:
                raise FilterValueError(
                    f"container id prefix {item!r} is too short: give at least {MIN_PREFIX}"
                    " characters"
                )
            item = item.lower()  # ids are lowercase; a pasted uppercase one still matches
        values.append(item)
    return tuple(dict.fromkeys(values))


def parse_names(text: str) -> tuple[str, ...]:
    return tuple(_items(text, "name"))


def parse_statuses(text: str) -> frozenset[str]:
    """Case-insensitive status names; NONE matches stateless UDP rows."""
    chosen = set()
    for item in _items(text, "status"):
        status = item.upper()
        if status not in STATUSES:
            raise FilterValueError(f"unknown status {item!r} (choose from {', '.join(STATUSES)})")
        chosen.add(status)
    return frozenset(chosen)


def _addresses(text: str | None) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    """A row's address as ipaddress objects: an IPv4-mapped IPv6 address both as itself
    and as its IPv4 address, so it matches IPv4 networks and IPv6 ones (``::/0``)."""
    ip = parse_ip(text)
    if ip is None:
        return ()
    plain = unmapped(ip)
    return (ip,) if plain is ip else (ip, plain)


def _in_networks(text: str | None, networks: tuple[Network, ...]) -> bool:
    return any(
        address.version == network.version and address in network
        for address in _addresses(text)
        for network in networks
    )


def _in_ranges(port: int | None, ranges: tuple[PortRange, ...]) -> bool:
    if port is not None:
        for first, last in ranges:  # a loop, not any(): this runs for every socket's change
            if first <= port <= last:
                return True
    return False


@dataclass(frozen=True)
class RowFilter:
    """Conditions combine with AND across options, OR within one option's list.

    ``keeps_connection`` needs socket fields only and runs first, so a row it rejects
    costs no process lookup; ``keeps_process`` decides on name, user and container.
    """

    protos: frozenset[str] | None = None
    ports: tuple[PortRange, ...] | None = None
    lports: tuple[PortRange, ...] | None = None
    rports: tuple[PortRange, ...] | None = None
    laddrs: tuple[Network, ...] | None = None
    raddrs: tuple[Network, ...] | None = None
    pids: frozenset[int] | None = None
    statuses: frozenset[str] | None = None
    excluded_statuses: frozenset[str] = frozenset()
    names: tuple[str, ...] | None = None
    users: frozenset[str] | None = None
    namespaces: frozenset[int] | None = None  # network namespace inodes
    containers: tuple[str, ...] | None = None  # container ids or prefixes
    # The --container matcher: it remembers the ids it has seen, to tell what matched.
    container_filter: ContainerFilter | None = field(
        default=None, init=False, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        if self.containers is not None:
            object.__setattr__(self, "container_filter", ContainerFilter(self.containers))

    @property
    def needs_process(self) -> bool:
        return self.names is not None or self.users is not None or self.containers is not None

    def keeps_connection(self, conn: Connection) -> bool:
        return self.keeps_socket(conn) and self.keeps_owner(conn)

    def keeps_socket(self, conn: Connection) -> bool:
        """``keeps_connection`` but for the pids: what the socket's own fields decide, so
        a socket dropped here needs no search for its owner either."""
        status = conn.status or psutil.CONN_NONE
        return (
            (self.protos is None or conn.proto in self.protos)
            and (
                self.ports is None
                or _in_ranges(conn.lport, self.ports)
                or _in_ranges(conn.rport, self.ports)
            )
            and (self.lports is None or _in_ranges(conn.lport, self.lports))
            and (self.rports is None or _in_ranges(conn.rport, self.rports))
            and (self.laddrs is None or _in_networks(conn.laddr, self.laddrs))
            and (self.raddrs is None or _in_networks(conn.raddr, self.raddrs))
            and (self.statuses is None or status in self.statuses)
            and status not in self.excluded_statuses
            and (self.namespaces is None or conn.netns in self.namespaces)
        )

    def keeps_owner(self, conn: Connection) -> bool:
        """``keeps_connection``'s condition on the pids (the holder, or any of them)."""
        return self.pids is None or conn.pid in self.pids or not self.pids.isdisjoint(conn.owners)

    def keeps_process(self, facts: ProcessFacts) -> bool:
        return (
            (self.names is None or _names_match(facts.name, self.names))
            and (self.users is None or facts.user in self.users)
            and (self.container_filter is None or self.container_filter.matches(facts.container))
        )


def _names_match(name: str | None, wanted: tuple[str, ...]) -> bool:
    return name is not None and any(_name_matches(name, one) for one in wanted)


def _name_matches(name: str, wanted: str) -> bool:
    """Exact, or a shell-style glob: a name like 'app[1]' is found by itself too."""
    return name == wanted or fnmatch.fnmatchcase(name, wanted)


def protocols(tcp: bool, udp: bool, ipv4: bool, ipv6: bool) -> frozenset[str] | None:
    """The proto names to keep; None (all) when no protocol or family was asked for."""
    if not (tcp or udp or ipv4 or ipv6):
        return None
    kinds = [kind for kind, on in (("tcp", tcp), ("udp", udp)) if on] or ["tcp", "udp"]
    suffixes = [s for s, on in (("", ipv4), ("6", ipv6)) if on] or ["", "6"]
    return frozenset(kind + suffix for kind in kinds for suffix in suffixes)
