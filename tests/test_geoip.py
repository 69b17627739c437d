"""GeoIP lookups: country and AS from separate files, address forms, bad files, bad data."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from geoip_db import write_asn_db, write_country_db, write_db
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from histstat import geoip
from histstat.geoip import MISSING_PACKAGE, GeoIP, GeoIPError, Place

COUNTRIES = {"192.0.2.0/24": "DE", "2001:db8::/32": "NL"}
ASNS = {"192.0.2.0/24": (64496, "Example Net"), "2001:db8:1::/48": (4200000000, "Big AS")}


@pytest.fixture
def files(tmp_path):
    return [
        write_country_db(tmp_path / "country.mmdb", COUNTRIES),
        write_asn_db(tmp_path / "asn.mmdb", ASNS),
    ]


@pytest.fixture
def geo(files):
    reader = GeoIP(files)
    yield reader
    reader.close()


def test_country_and_as_come_from_two_files(geo):
    assert geo.place_of("192.0.2.7") == Place("DE", 64496, "Example Net")


def test_ipv6(geo):
    assert geo.place_of("2001:db8::1") == Place("NL")
    assert geo.place_of("2001:db8:1::5") == Place("NL", 4200000000, "Big AS")


def test_ipv4_mapped_ipv6_is_looked_up_as_ipv4(geo):
    assert geo.place_of("::ffff:192.0.2.7") == Place("DE", 64496, "Example Net")


def test_ipv6_zone_is_ignored(geo):
    assert geo.place_of("2001:db8::1%eth0") == Place("NL")


@pytest.mark.parametrize(
    "address", [None, "", "198.51.100.1", "::1", "not an address", "192.0.2", "%", "::ffff:1.2.3.4"]
)
def test_unknown_or_unparsable_is_unknown(geo, address):
    assert geo.place_of(address) == Place()


def test_each_field_from_the_first_file_that_knows_it(tmp_path):
    first = write_country_db(tmp_path / "first.mmdb", {"192.0.2.0/25": "FR"})
    second = write_country_db(tmp_path / "second.mmdb", {"192.0.2.0/24": "DE"})
    geo = GeoIP([first, second])
    try:
        assert geo.place_of("192.0.2.1") == Place("FR")
        assert geo.place_of("192.0.2.200") == Place("DE")
    finally:
        geo.close()


def test_number_and_name_of_an_as_come_from_one_file(tmp_path):
    names_only = write_db(
        tmp_path / "a.mmdb", {"192.0.2.0/24": {"autonomous_system_organization": "Name Only"}}
    )
    full = write_asn_db(tmp_path / "b.mmdb", {"192.0.2.0/24": (64496, "Example Net")})
    geo = GeoIP([names_only, full])
    try:
        assert geo.place_of("192.0.2.1") == Place(None, None, "Name Only")
    finally:
        geo.close()


def test_ipv4_only_file(tmp_path):
    path = write_asn_db(tmp_path / "asn4.mmdb", {"192.0.2.0/24": (64496, "Example Net")}, 4)
    geo = GeoIP([path])
    try:
        assert geo.place_of("192.0.2.9") == Place(None, 64496, "Example Net")
        assert geo.place_of("::ffff:192.0.2.9") == Place(None, 64496, "Example Net")
        assert geo.place_of("2001:db8::1") == Place()
    finally:
        geo.close()


def test_a_city_file_gives_its_country(tmp_path):
    city = {"city": {"names": {"en": "Berlin"}}, "country": {"iso_code": "DE", "names": {}}}
    path = write_db(tmp_path / "city.mmdb", {"192.0.2.0/24": city}, "GeoLite2-City")
    geo = GeoIP([path])
    try:
        assert geo.place_of("192.0.2.1") == Place("DE")
    finally:
        geo.close()


@pytest.mark.parametrize(
    "record",
    [
        "a string, not a map",
        [1, 2],
        {"country": "DE"},
        {"country": {"iso_code": 276}},
        {"country": {"iso_code": ""}},
        {"autonomous_system_number": "64496"},
        {"autonomous_system_number": True},
        {"autonomous_system_number": -1},
        {"autonomous_system_number": 1.5},
        {"autonomous_system_organization": 7},
    ],
)
def test_values_of_the_wrong_type_are_unknown(tmp_path, record):
    geo = GeoIP([write_db(tmp_path / "odd.mmdb", {"192.0.2.0/24": record})])
    try:
        assert geo.place_of("192.0.2.1") == Place()
    finally:
        geo.close()


def test_text_is_kept_as_it_is(tmp_path):
    # Escaping is the formatter's work; here the text must arrive unchanged.
    org = "Evil\x1b[31m\nNet\u202e"
    record = {"country": {"iso_code": "D\tE"}, "autonomous_system_organization": org}
    geo = GeoIP([write_db(tmp_path / "odd.mmdb", {"192.0.2.0/24": record})])
    try:
        assert geo.place_of("192.0.2.1") == Place("D\tE", None, org)
    finally:
        geo.close()


def test_a_map_key_that_is_not_text_does_not_crash(tmp_path):
    # maxminddb 3.2's C extension dies with SIGSEGV on this record; histstat's reader
    # must not (a child process, so a regression cannot take the test run down too).
    record = {"autonomous_system_number": 64496, 7: "x", "country": {"iso_code": "DE"}}
    path = write_db(tmp_path / "odd.mmdb", {"192.0.2.0/24": record})
    code = (
        "import sys; from histstat.geoip import GeoIP; "
        "print(tuple(GeoIP([sys.argv[1]]).place_of('192.0.2.1')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, path], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "('DE', 64496, None)"


class CountingReader:
    def __init__(self, reader):
        self.reader = reader
        self.calls = 0

    def get(self, address):
        self.calls += 1
        return self.reader.get(address)

    def close(self):
        self.reader.close()


def test_results_are_cached_and_bounded(geo, monkeypatch):
    monkeypatch.setattr(geoip, "_MAX_CACHED", 3)
    counting = [(CountingReader(reader), version) for reader, version in geo._readers]
    geo._readers = counting
    assert (
        geo.place_of("192.0.2.1") == geo.place_of("192.0.2.1") == Place("DE", 64496, "Example Net")
    )
    assert counting[0][0].calls == 1
    for address in ("192.0.2.2", "192.0.2.3", "192.0.2.4"):
        geo.place_of(address)
    assert len(geo._cache) == 3
    assert "192.0.2.1" not in geo._cache  # the oldest went first
    geo.place_of("192.0.2.1")
    assert counting[0][0].calls == 5


class BrokenReader:
    def get(self, address):
        raise RuntimeError("The MaxMind DB file's data section contains bad data")

    def close(self):
        raise OSError("cannot close")


def test_a_failing_lookup_is_unknown(geo):
    geo._readers = [(BrokenReader(), 6)] + geo._readers
    assert geo.place_of("192.0.2.1") == Place("DE", 64496, "Example Net")
    geo._readers = [(BrokenReader(), 6)]
    assert geo.place_of("192.0.2.2") == Place()
    geo.close()


def test_lookups_after_close_do_not_raise(geo):
    geo.place_of("192.0.2.1")
    geo.close()
    geo.close()
    assert geo.place_of("192.0.2.1") == Place("DE", 64496, "Example Net")  # from the cache
    assert geo.place_of("2001:db8::1") == Place()


def test_no_files(tmp_path):
    geo = GeoIP([])
    assert geo.place_of("192.0.2.1") == Place()
    geo.close()


def one_line_error(paths: list[str]) -> str:
    with pytest.raises(GeoIPError) as raised:
        GeoIP(paths)
    message = str(raised.value)
    assert "\n" not in message and "\r" not in message
    return message


def test_missing_file(tmp_path, files):
    path = str(tmp_path / "absent.mmdb")
    message = one_line_error([*files, path])
    assert path in message and "No such file" in message


def test_directory(tmp_path):
    message = one_line_error([str(tmp_path)])
    assert str(tmp_path) in message and "directory" in message


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    assert str(path) in one_line_error([str(path)])


@pytest.mark.parametrize(
    "content",
    [b"", os.urandom(4096), b"not a database\n", b"\xab\xcd\xefMaxMind.com" + bytes(64)],
    ids=["empty", "random", "text", "bare-marker"],
)
def test_not_a_database(tmp_path, content):
    path = tmp_path / "bad.mmdb"
    path.write_bytes(content)
    message = one_line_error([str(path)])
    assert str(path) in message and "MaxMind" in message


def test_truncated_database(tmp_path, files):
    data = open(files[0], "rb").read()
    path = tmp_path / "short.mmdb"
    path.write_bytes(data[: len(data) // 2])
    assert str(path) in one_line_error([str(path)])


def test_a_name_with_a_newline_stays_on_one_line(tmp_path):
    one_line_error([str(tmp_path / "two\nlines.mmdb")])


def test_without_maxminddb(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "maxminddb", None)  # import now raises ImportError
    assert one_line_error(files) == MISSING_PACKAGE
    # From the checkout: the index's "histstat" is the old 1.2.x tool.
    assert "pip install '.[geoip]'" in MISSING_PACKAGE
    assert "histstat[" not in MISSING_PACKAGE


def test_module_imports_without_maxminddb():
    code = "import sys; sys.modules['maxminddb'] = None; import histstat.geoip"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(address=st.text(max_size=60) | st.ip_addresses().map(str))
def test_lookup_never_raises(geo, address):
    assert isinstance(geo.place_of(address), Place)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(damage=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1))
def test_a_damaged_file_fails_at_open_or_gives_unknowns(files, tmp_path, damage):
    data = bytearray(open(files[1], "rb").read())
    for position, value in damage:
        data[position % len(data)] = value
    path = tmp_path / "damaged.mmdb"
    path.write_bytes(bytes(data))
    try:
        geo = GeoIP([str(path)])
    except GeoIPError as exc:
        assert "\n" not in str(exc)
        return
    try:
        for address in ("192.0.2.1", "2001:db8:1::1", "::ffff:192.0.2.1", "10.0.0.1", "::"):
            assert isinstance(geo.place_of(address), Place)
    finally:
        geo.close()
