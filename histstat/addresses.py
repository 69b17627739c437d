"""IP addresses as sockets show them: zones dropped, IPv4-mapped IPv6 seen as IPv4."""

from __future__ import annotations

import ipaddress


def parse_ip(text: str | None):
    """The address as an ipaddress object, without an IPv6 zone ("fe80::1%eth0" names
    an interface of this machine, not part of the address); None if it is not one."""
    if not isinstance(text, str):
        return None
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def unmapped(ip):
    """A dual-stack socket's IPv4 peer (::ffff:a.b.c.d) as the IPv4 address it is."""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
