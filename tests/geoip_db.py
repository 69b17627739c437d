"""Small MaxMind DB files for tests, laid out like GeoLite2-Country and GeoLite2-ASN.

The tests never ship or download a real database. Networks are CIDR strings, IPv4 or
IPv6, in one IPv6 tree (as MaxMind's own files are): mmdb-writer stores IPv4 networks
under ::/96, which is where readers look up IPv4 addresses. Unlike MaxMind's files,
::ffff:0:0/96 is not aliased to them, so a hit there for ::ffff:a.b.c.d shows that
histstat looked the address up as IPv4 itself.

mmdb-writer (and netaddr, which it uses) are imported on use, so that a module importing
these helpers still loads where the test extra is missing.
"""

from __future__ import annotations

import os
from typing import Any, Union

PathLike = Union[str, "os.PathLike[str]"]


def write_db(
    path: PathLike,
    records: dict[str, Any],
    database_type: str = "GeoLite2-Country",
    ip_version: int = 6,
) -> str:
    """Write ``{network: record}`` to ``path``; return the path as a string.

    The record is any value a MaxMind DB can hold, so tests can also write ones a real
    database would not have. ``ip_version=4`` gives an IPv4-only tree.
    """
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(
        ip_version=ip_version,
        database_type=database_type,
        description="histstat test database",
        ipv4_compatible=ip_version == 6,
    )
    for network, record in records.items():
        writer.insert_network(IPSet([network]), record)
    writer.to_db_file(os.fspath(path))
    return os.fspath(path)


def write_country_db(path: PathLike, networks: dict[str, str], ip_version: int = 6) -> str:
    """A Country-style file: ``{network: iso_code}`` as ``{"country": {"iso_code": ...}}``."""
    records = {network: {"country": {"iso_code": code}} for network, code in networks.items()}
    return write_db(path, records, "GeoLite2-Country", ip_version)


def write_asn_db(path: PathLike, networks: dict[str, tuple[int, str]], ip_version: int = 6) -> str:
    """An ASN-style file: ``{network: (asn, organization)}`` as
    ``{"autonomous_system_number": asn, "autonomous_system_organization": organization}``."""
    records = {
        network: {"autonomous_system_number": asn, "autonomous_system_organization": org}
        for network, (asn, org) in networks.items()
    }
    return write_db(path, records, "GeoLite2-ASN", ip_version)
