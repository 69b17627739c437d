"""Country and autonomous system of remote addresses, from MaxMind databases (--geoip)."""

from __future__ import annotations

import os
import stat
import threading
from typing import Any, NamedTuple

from histstat.addresses import parse_ip, unmapped

# Installed from histstat's checkout: the package index's "histstat" is the old 1.2.x
# tool, which naming it with the extra would fetch.
MISSING_PACKAGE = (
    "--geoip needs the maxminddb package: pip install '.[geoip]' in histstat's checkout"
    " (or pip install 'maxminddb>=2')"
)
# Every MaxMind DB file ends with its metadata, which starts with this marker within
# the last 128 KiB (the format's own rule).
_METADATA_MARKER = b"\xab\xcd\xefMaxMind.com"
_METADATA_WINDOW = 128 * 1024
# A busy machine talks to a few thousand remote addresses at most; the cap only keeps a
# long run that meets ever new addresses (a scan, a server) from growing without end.
_MAX_CACHED = 4096


class GeoIPError(Exception):
    """A database that cannot be used; the message is one line naming the file."""


class Place(NamedTuple):
    country: str | None = None  # ISO 3166 alpha-2 code, e.g. "DE"
    asn: int | None = None
    as_org: str | None = None


UNKNOWN_PLACE = Place()


def _text(value: Any) -> str | None:
    # Database content is untrusted: anything but a non-empty string counts as unknown.
    # The text itself is kept as it is; the formatter escapes it for output.
    return value if isinstance(value, str) and value else None


def _asn(value: Any) -> int | None:
    # bool is an int subclass, and an AS number is never negative.
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _country(record: dict[str, Any]) -> str | None:
    country = record.get("country")
    return _text(country.get("iso_code")) if isinstance(country, dict) else None


def _lookup_key(address: str) -> tuple[str, int] | None:
    """The address as a database lookup takes it, and its IP version; None if unparsable."""
    ip = parse_ip(address)
    if ip is None:
        return None
    # Not every database aliases ::ffff:0:0/96 to its IPv4 networks: look those up as
    # IPv4 directly.
    ip = unmapped(ip)
    return str(ip), ip.version


class GeoIP:
    """Readers of one or more MaxMind DB files, asked together about each address.

    Country and AS data come in separate files (GeoLite2-Country or -City, and
    GeoLite2-ASN); each field is taken from the first file, in the order given, that
    knows it. Each file is held in memory for the whole run (see ``_open``).
    """

    def __init__(self, paths: list[str]) -> None:
        """Open every file now, so that an unusable one stops histstat before polling."""
        try:
            import maxminddb  # an optional extra: histstat must run without it
        except ImportError:
            raise GeoIPError(MISSING_PACKAGE) from None
        self._readers: list[tuple[Any, int]] = []  # (reader, IP version of its tree)
        self._cache: dict[str, Place] = {}
        # Lookups may come from more than one thread; the lock guards only the cache.
        self._lock = threading.Lock()
        try:
            for path in paths:
                self._readers.append(_open(maxminddb, path))
        except GeoIPError:
            self.close()
            raise

    def place_of(self, address: str | None) -> Place:
        """Country and AS of an address; Place() when no file knows it or it is not an
        IP address. Never raises: a damaged file gives unknown values, not a failed poll."""
        if not isinstance(address, str) or not address:
            return UNKNOWN_PLACE
        with self._lock:
            place = self._cache.get(address)
        if place is not None:
            return place
        place = self._look_up(address)
        with self._lock:
            if address not in self._cache:
                if len(self._cache) >= _MAX_CACHED:
                    del self._cache[next(iter(self._cache))]
                self._cache[address] = place
        return place

    def _look_up(self, address: str) -> Place:
        key = _lookup_key(address)
        if key is None:
            return UNKNOWN_PLACE
        text, version = key
        country: str | None = None
        asn: int | None = None
        as_org: str | None = None
        for reader, tree_version in self._readers:
            if version > tree_version:
                continue  # an IPv4-only file cannot know an IPv6 address
            try:
                record = reader.get(text)
            except Exception:
                # maxminddb raises InvalidDatabaseError for damaged data, ValueError for
                # a closed reader, and may raise others; none of them is worth a poll.
                continue
            if not isinstance(record, dict):
                continue
            if country is None:
                country = _country(record)
            # Number and name come from the same record, never mixed across files.
            if asn is None and as_org is None:
                asn = _asn(record.get("autonomous_system_number"))
                as_org = _text(record.get("autonomous_system_organization"))
        if country is None and asn is None and as_org is None:
            return UNKNOWN_PLACE
        return Place(country, asn, as_org)

    def close(self) -> None:
        """Close every file; later lookups answer only from the cache, or Place()."""
        readers, self._readers = self._readers, []
        for reader, _ in readers:
            try:
                reader.close()
            except Exception:
                pass  # nothing useful can be done about a reader that fails to close


def _open(maxminddb: Any, path: str) -> tuple[Any, int]:
    """A reader of one file and the IP version of its tree, or GeoIPError."""

    def fail(reason: str) -> GeoIPError:
        # repr keeps the message on one line whatever the file name holds.
        return GeoIPError(f"cannot use GeoIP database {path!r}: {reason}")

    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise fail(exc.strerror or str(exc)) from exc
    if stat.S_ISDIR(mode):
        raise fail("Is a directory")
    if not stat.S_ISREG(mode):
        # A FIFO or a device could block the open, or never end.
        raise fail("not a regular file")
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - _METADATA_WINDOW))
            tail = handle.read()
    except OSError as exc:
        raise fail(exc.strerror or str(exc)) from exc
    if _METADATA_MARKER not in tail:
        # Refused before the whole file is read into memory below: a wrong file given
        # by mistake may be large.
        raise fail("not a MaxMind DB file, or a damaged one")
    try:
        # The pure-Python reader, on a copy of the file in memory, rather than the C
        # extension: the extension (maxminddb 3.2) crashes the whole process on some
        # damaged records (a map key that is not a string), where the Python reader
        # raises; and a copy cannot change under a long run (an mmap of a file
        # rewritten in place gives SIGBUS or garbage). Lookups are slower (tens of
        # microseconds), which the cache in GeoIP makes up for.
        reader = maxminddb.open_database(path, maxminddb.MODE_MEMORY)
    except OSError as exc:
        raise fail(exc.strerror or str(exc)) from exc
    except Exception as exc:
        # InvalidDatabaseError in the usual case, but damaged metadata can surface as
        # other errors (TypeError, IndexError...); all mean the same to the user.
        raise fail("not a MaxMind DB file, or a damaged one") from exc
    try:
        version = int(reader.metadata().ip_version)
        # One lookup walks the search tree into the data section: a file damaged on
        # that path fails now, at start, rather than giving unknown values all run.
        reader.get("0.0.0.0")
    except Exception as exc:
        reader.close()
        raise fail("not a MaxMind DB file, or a damaged one") from exc
    if version not in (4, 6):
        reader.close()
        raise fail(f"unknown IP version {version} in its metadata")
    return reader, version
