"""Community ID v1, the flow hash that lets histstat's documents join Zeek's and Suricata's.

The published specification (github.com/corelight/community-id-spec): SHA-1 over a
16-bit seed, both addresses, the IP protocol number, a zero byte and both ports, the
endpoints ordered so that either end's view of a flow gives the same hash; base64, with
the version "1:" before it. Only TCP and UDP, which have ports, are histstat's.
"""

from __future__ import annotations

import base64
import hashlib
import struct

from histstat.addresses import parse_ip, unmapped

# IANA protocol numbers of the transports a row can have.
PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17}


def community_id(
    transport: str,
    one_address: str | None,
    one_port: int | None,
    other_address: str | None,
    other_port: int | None,
    seed: int = 0,
) -> str | None:
    """The Community ID of the flow between two endpoints, in either order; None when
    it has none (no remote end, another protocol, addresses of two IP versions).

    A dual-stack socket's IPv4-mapped peer (::ffff:a.b.c.d) is hashed as the IPv4
    address its packets carry, as a sensor on the wire sees them."""
    number = PROTOCOL_NUMBERS.get(transport)
    one, other = parse_ip(one_address), parse_ip(other_address)
    if number is None or one is None or other is None or one_port is None or other_port is None:
        return None
    one, other = unmapped(one), unmapped(other)
    if one.version != other.version:
        return None
    # The smaller endpoint first, comparing addresses in network byte order, then ports.
    (first, first_port), (second, second_port) = sorted(
        ((one.packed, one_port), (other.packed, other_port))
    )
    hashed = (
        struct.pack("!H", seed)
        + first
        + second
        + struct.pack("!BBHH", number, 0, first_port, second_port)
    )
    return "1:" + base64.b64encode(hashlib.sha1(hashed).digest()).decode("ascii")
