"""ECS documents: ECS's names and types, the initiator as source, one safe line each."""

from __future__ import annotations

import datetime
import json

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from histstat.output.community_id import community_id
from histstat.output.ecs import ECS_VERSION, HostFacts, ecs_document, format_ecs_row
from histstat.output.format import HIDDEN_RANGES
from histstat.records import ProcessRef
from support.ecs_fields import ECS_FIELDS, HISTSTAT_FIELDS, leaves, problems
from support.ecs_fields import ECS_VERSION as DEFINED_VERSION
from support.rows import SEEN, sample_row

try:
    import communityid
except ImportError:  # pragma: no cover - the test extra installs it
    communityid = None

HOST = HostFacts("analyst-box", "9.9.9", lambda name: {"alice": 1000}.get(name))
STARTED = datetime.datetime(2026, 11, 26, 3, 0, 0, 500000, tzinfo=datetime.timezone.utc)

# The sample row: the server's end (lport 8000) of a loopback connection from port 50000.
SERVER_END = {"ip": "127.0.0.1", "port": 8000}
CLIENT_END = {"ip": "127.0.0.1", "port": 50000}


CONTAINER = "4f1d" * 16


def full_row(**changes):
    """The sample row with every fact histstat can know of it."""
    return sample_row(
        ppid=1, parent="systemd", args=("python3", "-m", "http.server", "8000"), args_count=4,
        started=STARTED, md5="a" * 32, sha256="b" * 64, direction="in",
        attribution="socket", rhost="client.example", country="DE", asn=64496,
        as_org="Example AS", owners=(ProcessRef(4242, "python3"), ProcessRef(4243, None)),
        owners_count=2, netns=4026532500, container=CONTAINER,
    )._replace(**changes)  # fmt: skip


def document(row) -> dict:
    """The document as a reader gets it, after checking it is one line that parses."""
    line = format_ecs_row(row, host=HOST)
    assert "\n" not in line and "\r" not in line
    parsed = json.loads(line)
    assert parsed == json.loads(json.dumps(ecs_document(row, HOST)))
    return parsed


def assert_follows_ecs(doc: dict) -> None:
    assert problems(doc) == []
    assert doc["ecs"]["version"] == ECS_VERSION == DEFINED_VERSION


def test_the_definitions_name_every_field_the_documents_can_hold():
    """Every field of the fullest documents is defined, and every definition is used
    by one of them: the checked-in subset is exactly what histstat writes."""
    rows = [
        full_row(
            event="close", duration=1.5, duration_from_start=False, bytes_sent=10, bytes_received=20
        ),
        full_row(direction="out"),
        full_row(direction="listen", status="LISTEN", raddr=None, rport=None),
    ]
    written = {name for row in rows for name, _ in leaves(document(row))}
    for row in rows:
        assert_follows_ecs(document(row))
    assert written == set(ECS_FIELDS) | set(HISTSTAT_FIELDS)


def test_a_close_row_is_a_connection_end_with_its_duration_in_nanoseconds():
    row = full_row(event="close", duration=2.25, duration_from_start=False)
    doc = document(row)
    assert_follows_ecs(doc)
    assert doc["event"] == {
        "kind": "event",
        "category": ["network"],
        "type": ["connection", "end"],
        "action": "connection-close",
        "duration": 2_250_000_000,
        "start": "2026-11-26T03:04:02.750678+00:00",
        "end": "2026-11-26T03:04:05.000678+00:00",
    }
    assert doc["@timestamp"] == doc["event"]["end"]
    assert doc["histstat"]["duration_from_start"] is False


@pytest.mark.parametrize(
    ("changes", "phase", "action"),
    [
        ({"event": "open", "duration_from_start": False}, "start", "connection-open"),
        ({"event": "open"}, "start", "connection-open"),
        ({"event": "open", "duration_from_start": True}, "info", "connection-open"),
        ({"event": "state", "status": "CLOSE_WAIT"}, "info", "connection-state"),
        ({"event": "update", "bytes_sent": 1, "bytes_received": 2}, "info", "connection-update"),
    ],
    ids=["open", "open-unmarked", "there-at-start", "state", "update"],
)
def test_every_event_has_its_type_and_action(changes, phase, action):
    doc = document(full_row(**changes))
    assert_follows_ecs(doc)
    assert doc["event"]["type"] == ["connection", phase]
    assert doc["event"]["action"] == action
    assert "duration" not in doc["event"] and "start" not in doc["event"]
    assert doc["histstat"]["event"] == changes["event"]


def test_an_incoming_connection_names_the_remote_client_as_source():
    doc = document(full_row(direction="in", bytes_sent=7000, bytes_received=5000))
    assert doc["network"]["direction"] == "ingress"
    assert doc["source"] == {
        **CLIENT_END, "bytes": 5000, "domain": "client.example",
        "geo": {"country_iso_code": "DE"},
        "as": {"number": 64496, "organization": {"name": "Example AS"}},
    }  # fmt: skip
    assert doc["destination"] == {**SERVER_END, "bytes": 7000}
    assert doc["network"]["bytes"] == 12000


def test_an_outgoing_connection_names_the_local_end_as_source():
    row = full_row(direction="out", lport=50000, rport=8000, bytes_sent=5000, bytes_received=7000)
    doc = document(row)
    assert doc["network"]["direction"] == "egress"
    assert doc["source"] == {**CLIENT_END, "bytes": 5000}
    assert doc["destination"]["port"] == 8000 and doc["destination"]["bytes"] == 7000
    assert doc["destination"]["domain"] == "client.example"  # -r names the remote end


def test_both_ends_documents_agree_on_source_destination_and_flow():
    server = document(full_row(direction="in", bytes_sent=7000, bytes_received=5000))
    client = document(full_row(direction="out", lport=50000, rport=8000, pid=4343,
                               bytes_sent=5000, bytes_received=7000))  # fmt: skip
    for part in ("source", "destination"):
        assert {k: server[part][k] for k in ("ip", "port", "bytes")} == {
            k: client[part][k] for k in ("ip", "port", "bytes")
        }
    assert server["network"]["community_id"] == client["network"]["community_id"]
    assert server["network"]["bytes"] == client["network"]["bytes"]


def test_an_unknown_direction_makes_the_local_end_the_source():
    """UDP, and a connection older than histstat whose listener it never saw."""
    for row in (full_row(direction=None), full_row(proto="udp", status=None, direction=None)):
        doc = document(row)
        assert_follows_ecs(doc)
        assert doc["network"]["direction"] == "unknown"
        assert {k: doc["source"][k] for k in ("ip", "port")} == SERVER_END
        assert doc["destination"]["port"] == 50000
    assert (
        document(full_row(proto="udp", status=None, direction=None))["network"]["transport"]
        == "udp"
    )


def test_a_socket_without_remote_end_has_a_source_only():
    doc = document(full_row(proto="udp", status=None, direction=None, raddr=None, rport=None))
    assert_follows_ecs(doc)
    assert doc["source"] == SERVER_END
    assert "destination" not in doc and "community_id" not in doc["network"]
    assert doc["related"]["ip"] == ["127.0.0.1"]


def test_a_listener_is_a_server_without_source_destination_or_direction():
    row = full_row(direction="listen", status="LISTEN", raddr=None, rport=None, rhost=None,
                   country=None, asn=None, as_org=None)  # fmt: skip
    for event, phase, action in (
        ("open", "start", "listen"),
        ("close", "end", "listen-close"),
        ("state", "info", "listen-state"),
    ):
        doc = document(row._replace(event=event))
        assert_follows_ecs(doc)
        assert doc["server"] == SERVER_END
        assert "source" not in doc and "destination" not in doc
        assert "direction" not in doc["network"] and "community_id" not in doc["network"]
        assert (doc["event"]["type"], doc["event"]["action"]) == ([phase], action)
    there_at_start = document(row._replace(duration_from_start=True))
    assert there_at_start["event"]["type"] == ["info"]


def test_ipv6_and_dual_stack_addresses_are_ecs_ip_values():
    v6 = document(full_row(proto="tcp6", laddr="::1", raddr="fe80::1%lo"))
    assert_follows_ecs(v6)
    assert v6["network"]["type"] == "ipv6"
    assert v6["source"]["ip"] == "fe80::1"  # the zone names an interface, not the address
    mapped = document(full_row(proto="tcp6", laddr="::ffff:127.0.0.1", raddr="::ffff:10.0.0.9"))
    assert_follows_ecs(mapped)
    assert mapped["network"]["type"] == "ipv4"  # what its packets carry
    assert (mapped["source"]["ip"], mapped["destination"]["ip"]) == ("10.0.0.9", "127.0.0.1")
    assert mapped["related"]["ip"] == ["127.0.0.1", "10.0.0.9"]
    assert mapped["network"]["community_id"] == reference_community_id(
        "tcp", "127.0.0.1", "10.0.0.9", 8000, 50000
    )


def test_bytes_are_left_out_where_unknown():
    doc = document(full_row(event="close", duration=1.0))
    assert "bytes" not in doc["source"] and "bytes" not in doc["destination"]
    assert "bytes" not in doc["network"]
    one_side = document(full_row(event="update", bytes_sent=3))
    assert one_side["destination"]["bytes"] == 3 and "bytes" not in one_side["network"]


def test_args_count_is_the_processs_not_what_the_command_limit_kept():
    cut = ("python3", "-m...[+20 chars]")  # --command-limit kept two of four arguments
    assert document(full_row(args=cut))["process"]["args_count"] == 4


def test_process_user_host_agent_related_and_histstat_facts():
    doc = document(full_row())
    assert doc["process"] == {
        "pid": 4242,
        "name": "python3",
        "executable": "/usr/bin/python3.11",
        "command_line": "python3 -m http.server 8000",
        "args": ["python3", "-m", "http.server", "8000"],
        "args_count": 4,
        "start": "2026-11-26T03:00:00.500000+00:00",
        "parent": {"pid": 1, "name": "systemd"},
        "hash": {"md5": "a" * 32, "sha256": "b" * 64},
    }
    assert doc["user"] == {"name": "alice", "id": "1000"}
    assert doc["host"] == {"name": "analyst-box", "hostname": "analyst-box"}
    assert doc["container"] == {"id": CONTAINER}  # the full id
    assert doc["agent"] == {"type": "histstat", "version": "9.9.9"}
    assert doc["related"] == {
        "ip": ["127.0.0.1"], "user": ["alice"], "hosts": ["analyst-box", "client.example"],
    }  # fmt: skip
    assert doc["histstat"] == {
        "event": "open", "proto": "tcp", "status": "ESTABLISHED", "direction": "in",
        "attribution": "socket", "command_length": 27,
        "owners": [{"pid": 4242, "name": "python3"}, {"pid": 4243}],
        "owners_count": 2, "netns": 4026532500,
    }  # fmt: skip


def test_unknown_facts_are_left_out_and_empty_ones_kept():
    row = sample_row(pid=None, pname=None, user=None, command=None, exe=None,
                     command_length=None)  # fmt: skip
    doc = document(row)
    assert_follows_ecs(doc)
    assert "process" not in doc and "user" not in doc and "user" not in doc["related"]
    assert "container" not in doc and "netns" not in doc["histstat"]
    empty = document(sample_row(pname="", command="", args=("",), user="nobody-known"))
    assert empty["process"]["name"] == "" and empty["process"]["args"] == [""]
    assert empty["user"] == {"name": "nobody-known"}  # no uid known for that name


HOSTILE = 'evil\n{"forged": 1}\r\x1b]0;owned\x07\u202e\udcff\x85\u2028'


def test_hostile_text_stays_one_line_of_escaped_json_with_its_true_value():
    row = full_row(pname=HOSTILE, command=HOSTILE, args=(HOSTILE, "\x00"), parent=HOSTILE,
                   exe=HOSTILE, user=HOSTILE, rhost=HOSTILE)  # fmt: skip
    line = format_ecs_row(row, host=HOST._replace(name=HOSTILE))
    assert "\n" not in line
    hidden = [c for c in line if any(lo <= ord(c) <= hi for lo, hi in HIDDEN_RANGES)]
    assert hidden == []
    doc = json.loads(line)
    true_text = HOSTILE.replace("\udcff", "\\xff")
    assert doc["process"]["name"] == doc["process"]["command_line"] == true_text
    assert doc["process"]["args"] == [true_text, "\x00"]
    assert doc["process"]["parent"]["name"] == doc["host"]["name"] == true_text
    assert doc["related"]["user"] == [true_text]


def test_a_cut_command_keeps_its_marker_and_length():
    cut = "python3 -m ht...[+13 chars]"
    doc = document(full_row(command=cut, args=("python3", "-m", "ht...[+13 chars]")))
    assert doc["process"]["command_line"] == cut
    assert doc["process"]["args"] == ["python3", "-m", "ht...[+13 chars]"]
    assert doc["histstat"]["command_length"] == 27


def test_timestamps_keep_their_offset():
    local = datetime.timezone(datetime.timedelta(hours=-5))
    doc = document(full_row(timestamp=SEEN.astimezone(local)))
    assert doc["@timestamp"] == "2026-11-25T22:04:05.000678-05:00"


def reference_community_id(transport, saddr, daddr, sport, dport):
    if communityid is None:
        pytest.fail("the reference package communityid is missing: pip install -e '.[test]'")
    make = communityid.FlowTuple.make_tcp if transport == "tcp" else communityid.FlowTuple.make_udp
    return communityid.CommunityID().calc(make(saddr, daddr, sport, dport))


# The specification's own example (its README: 128.232.110.120:34855 -> 66.35.250.204:80,
# TCP), and the reference package's answers for a few more.
def test_community_id_matches_the_specifications_example():
    assert (
        community_id("tcp", "128.232.110.120", 34855, "66.35.250.204", 80)
        == "1:LQU9qZlK+B5F3KDmev6m5PMibrg="
    )


ipv4 = st.ip_addresses(v=4).map(str)
# Not IPv4-mapped: histstat hashes those as the IPv4 addresses their packets carry
# (test_ipv6_and_dual_stack_addresses_are_ecs_ip_values).
ipv6 = st.ip_addresses(v=6).filter(lambda ip: ip.ipv4_mapped is None).map(str)
ports = st.integers(0, 65535)


@given(
    transport=st.sampled_from(["tcp", "udp"]),
    addresses=st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)),
    sport=ports,
    dport=ports,
)
def test_community_id_matches_the_reference_package_both_ways(transport, addresses, sport, dport):
    saddr, daddr = addresses
    expected = reference_community_id(transport, saddr, daddr, sport, dport)
    assert community_id(transport, saddr, sport, daddr, dport) == expected
    assert community_id(transport, daddr, dport, saddr, sport) == expected


def test_community_id_of_a_loopback_flow_to_itself_and_of_no_flow():
    same = reference_community_id("udp", "127.0.0.1", "127.0.0.1", 5353, 53)
    assert community_id("udp", "127.0.0.1", 53, "127.0.0.1", 5353) == same
    assert community_id("tcp", "127.0.0.1", 80, None, None) is None
    assert community_id("tcp", "127.0.0.1", 80, "::1", 80) is None
    assert community_id("sctp", "127.0.0.1", 80, "127.0.0.1", 81) is None


maybe_text = st.none() | st.text(max_size=12)
addresses = st.one_of(ipv4, ipv6, st.just("::ffff:10.0.0.1"), st.just("fe80::1%eth0"),
                      st.text(max_size=8))  # fmt: skip


@given(
    event=st.sampled_from(["open", "close", "state", "update"]),
    proto=st.sampled_from(["tcp", "tcp6", "udp", "udp6"]),
    laddr=addresses,
    remote=st.none() | st.tuples(addresses, ports),
    direction=st.sampled_from([None, "in", "out", "listen"]),
    duration=st.none() | st.floats(0, 1e6),
    from_start=st.none() | st.booleans(),
    sent=st.none() | st.integers(0, 2**63),
    received=st.none() | st.integers(0, 2**63),
    text=maybe_text,
)
@example(event="open", proto="tcp", laddr="127.0.0.1", remote=None, direction=None,
         duration=None, from_start=None, sent=None, received=None, text="LISTEN")  # fmt: skip
def test_any_row_makes_a_document_of_ecs_fields_and_types(
    event, proto, laddr, remote, direction, duration, from_start, sent, received, text
):
    raddr, rport = remote or (None, None)
    row = full_row(event=event, proto=proto, laddr=laddr, raddr=raddr, rport=rport,
                   direction=direction, duration=duration, duration_from_start=from_start,
                   bytes_sent=sent, bytes_received=received, pname=text, parent=text,
                   user=text, rhost=text, status=text)  # fmt: skip
    doc = document(row)
    assert problems(doc) == []
    # A listener is told by its direction, or by its LISTEN state (a row whose
    # direction is unknown).
    assert ("server" in doc) == (direction == "listen" or text == "LISTEN")
    if "duration" in doc["event"]:
        assert event == "close"
