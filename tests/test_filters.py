"""Filter values parse strictly, and rows are kept by AND across options, OR within one."""

import pytest

from histstat.filters import (
    STATUSES,
    FilterValueError,
    RowFilter,
    parse_containers,
    parse_namespaces,
    parse_networks,
    parse_pids,
    parse_ports,
    parse_statuses,
    protocols,
)
from histstat.records import Connection, ProcessFacts

WEB = Connection("tcp", "10.0.0.5", 443, "203.0.113.9", 51000, "ESTABLISHED", 100)
SSH_LISTEN = Connection("tcp6", "::", 22, None, None, "LISTEN", 200)
DNS = Connection("udp", "127.0.0.53", 53, None, None, None, 300)
MAPPED = Connection("tcp6", "::ffff:10.0.0.5", 8080, "::ffff:192.168.1.7", 40000, "SYN_RECV", 400)
ORPHAN = Connection("tcp", "127.0.0.1", 8000, "127.0.0.1", 41000, "TIME_WAIT", None)
ALL = [WEB, SSH_LISTEN, DNS, MAPPED, ORPHAN]


def kept(row_filter: RowFilter) -> list:
    return [conn for conn in ALL if row_filter.keeps_connection(conn)]


def test_port_lists_and_ranges():
    assert parse_ports("22,80,8000-8100") == ((22, 22), (80, 80), (8000, 8100))
    assert parse_ports(" 0 , 65535 ") == ((0, 0), (65535, 65535))


@pytest.mark.parametrize(
    "bad",
    ["70000", "90-80", "http", "", "22,", "-5", "1-2-3", "1.5", "\u00b2", "\u0661", "2_2",
     "8\u0660-90", "9" * 5000],
)  # fmt: skip
def test_malformed_ports_name_the_value(bad):
    with pytest.raises(FilterValueError) as caught:
        parse_ports(bad)
    assert repr(bad.split(",")[0].strip()) in str(caught.value) or "empty" in str(caught.value)


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "300.1.1.1", "example.com", "::1/129", "10.0.0.1,"])
def test_malformed_addresses_are_refused(bad):
    with pytest.raises(FilterValueError):
        parse_networks(bad)


def test_unknown_status_lists_the_choices():
    with pytest.raises(FilterValueError) as caught:
        parse_statuses("established,OPEN")
    assert "'OPEN'" in str(caught.value)
    assert all(status in str(caught.value) for status in STATUSES)


def test_statuses_are_case_insensitive():
    assert parse_statuses("listen,Time_Wait,none") == {"LISTEN", "TIME_WAIT", "NONE"}


@pytest.mark.parametrize("bad", ["12a", "\u00b2", "\u0661\u0662", "1_2", "9" * 5000])
def test_bad_pid_is_refused(bad):
    with pytest.raises(FilterValueError, match=repr(bad)):
        parse_pids(f"1,{bad}")


def test_protocol_and_family_switches():
    assert protocols(False, False, False, False) is None
    assert protocols(True, False, False, False) == {"tcp", "tcp6"}
    assert protocols(False, True, True, False) == {"udp"}
    assert protocols(False, False, False, True) == {"tcp6", "udp6"}
    assert protocols(True, True, True, True) == {"tcp", "tcp6", "udp", "udp6"}


def test_port_matches_local_or_remote():
    assert kept(RowFilter(ports=parse_ports("51000,53"))) == [WEB, DNS]
    assert kept(RowFilter(lports=parse_ports("51000,53"))) == [DNS]
    assert kept(RowFilter(rports=parse_ports("40000-60000"))) == [WEB, MAPPED, ORPHAN]


def test_networks_v4_v6_and_v4_mapped():
    assert kept(RowFilter(laddrs=parse_networks("10.0.0.0/8"))) == [WEB, MAPPED]
    assert kept(RowFilter(laddrs=parse_networks("::/0"))) == [SSH_LISTEN, MAPPED]
    assert kept(RowFilter(raddrs=parse_networks("192.168.1.7"))) == [MAPPED]
    assert kept(RowFilter(raddrs=parse_networks("::ffff:192.168.0.0/112"))) == [MAPPED]
    assert kept(RowFilter(raddrs=parse_networks("0.0.0.0/0"))) == [WEB, MAPPED, ORPHAN]


def test_status_none_means_stateless_udp_and_exclusion_wins():
    assert kept(RowFilter(statuses=parse_statuses("NONE"))) == [DNS]
    assert kept(RowFilter(excluded_statuses=parse_statuses("time_wait,none"))) == [
        WEB,
        SSH_LISTEN,
        MAPPED,
    ]
    assert kept(RowFilter(statuses=parse_statuses("LISTEN"), excluded_statuses={"LISTEN"})) == []


def test_options_combine_with_and():
    both = RowFilter(protos=protocols(True, False, False, False), ports=parse_ports("443,53"))
    assert kept(both) == [WEB]
    assert kept(RowFilter(pids=parse_pids("100,300,999"))) == [WEB, DNS]


def test_process_filters_use_exact_names_globs_and_users():
    facts = ProcessFacts(name="python3.11", user="alice")
    assert RowFilter(names=("python3.11",)).keeps_process(facts)
    assert RowFilter(names=("nginx", "python*")).keeps_process(facts)
    assert not RowFilter(names=("python",)).keeps_process(facts)
    assert RowFilter(names=("app[1]",)).keeps_process(ProcessFacts(name="app[1]"))
    assert not RowFilter(names=("*",)).keeps_process(ProcessFacts())
    assert RowFilter(users=frozenset({"bob", "alice"})).keeps_process(facts)
    assert not RowFilter(users=frozenset({"bob"})).keeps_process(facts)
    assert RowFilter().keeps_process(ProcessFacts())
    assert RowFilter(names=("x",)).needs_process and not RowFilter().needs_process


def test_namespaces_are_inode_numbers_alone_or_as_readlink_shows_them():
    assert parse_namespaces("4026531840, net:[4026532500]") == frozenset({4026531840, 4026532500})


@pytest.mark.parametrize(
    "bad", ["abc", "net:4026531840", "net:[4026531840", "4026531840]", "0", "4294967296",
            "-1", "\u0661", "mnt:[4026531840]", "1,"],
)  # fmt: skip
def test_a_bad_namespace_is_refused_by_name(bad):
    with pytest.raises(FilterValueError, match="namespace"):
        parse_namespaces(bad)


def test_the_netns_filter_keeps_only_connections_of_those_namespaces():
    mine, theirs = WEB._replace(netns=4026531840), WEB._replace(netns=4026532500)
    chosen = RowFilter(namespaces=parse_namespaces("4026532500"))
    assert [chosen.keeps_connection(c) for c in (mine, theirs, WEB)] == [False, True, False]


ID = "4f1e2b3c" * 8


def test_containers_are_full_ids_prefixes_of_twelve_or_machine_names():
    assert parse_containers(f"{ID},{ID[:12]},my-box,{ID}") == (ID, ID[:12], "my-box")


@pytest.mark.parametrize("bad", [ID[:11], "4f1e", "", "a b", "-rf", "x" * 65, "web,"])
def test_a_short_id_prefix_or_odd_value_is_refused(bad):
    with pytest.raises(FilterValueError, match="container"):
        parse_containers(bad)


def test_a_machine_name_matches_whole_and_a_pasted_uppercase_id_matches():
    assert parse_containers(ID[:12].upper()) == (ID[:12],)
    chosen = RowFilter(containers=parse_containers("webserver-pr," + ID[:12].upper()))
    assert not chosen.keeps_process(ProcessFacts(container="webserver-production"))
    assert chosen.keeps_process(ProcessFacts(container="webserver-pr"))
    assert chosen.keeps_process(ProcessFacts(container=ID))


def test_the_container_filter_decides_on_the_process_facts():
    chosen = RowFilter(containers=(ID[:12], "my-box"))
    assert chosen.needs_process
    assert chosen.keeps_process(ProcessFacts(container=ID))
    assert chosen.keeps_process(ProcessFacts(container="my-box"))
    assert not chosen.keeps_process(ProcessFacts(container="my-box2"))
    assert not chosen.keeps_process(ProcessFacts())  # in no container
    assert RowFilter(containers=(ID,)) == RowFilter(containers=(ID,))  # configs compare


def test_socket_fields_and_owner_split_what_keeps_connection_decides():
    """keeps_socket decides on everything but the pids, keeps_owner on the pids alone:
    the poller asks the first before it searches an ownerless socket's owner."""
    on_port = RowFilter(ports=parse_ports("8000"))
    assert [conn for conn in ALL if on_port.keeps_socket(conn)] == [ORPHAN]
    assert all(on_port.keeps_owner(conn) for conn in ALL)
    by_pid = RowFilter(pids=parse_pids("100,300"), statuses=parse_statuses("ESTABLISHED,NONE"))
    assert [conn for conn in ALL if by_pid.keeps_socket(conn)] == [WEB, DNS]
    assert [conn for conn in ALL if by_pid.keeps_owner(conn)] == [WEB, DNS]
    assert by_pid.keeps_socket(WEB._replace(pid=None))
    assert not by_pid.keeps_owner(WEB._replace(pid=None))
    assert by_pid.keeps_owner(ORPHAN._replace(owners=(7, 300)))
    for row_filter in (on_port, by_pid, RowFilter(pids=parse_pids("400"), protos={"tcp6"})):
        for conn in ALL:
            assert row_filter.keeps_connection(conn) == (
                row_filter.keeps_socket(conn) and row_filter.keeps_owner(conn)
            )
