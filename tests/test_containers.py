"""Container ids from cgroup paths: the parser on a table of layouts, odd names included,
the (pid, start time) cache, the --container matching, and as root a child in a cgroup
named like Docker's."""

from __future__ import annotations

import subprocess

import pytest

from histstat.containers import (
    ContainerFilter,
    container_id,
    container_matches,
    container_of_path,
    read_container_id,
)
from histstat.sources.namespaces import NamespaceDiscovery
from support.namespaces import docker_like_cgroup, join_cgroup, netns_inode, start_netns_child

ID = "4f1e2b3c" * 8  # 64 hex, like every runtime's ids
OTHER = "0123456789abcdef" * 4
POD = "pod0a1b2c3d-4e5f-6789-abcd-ef0123456789"
POD_SYSTEMD = "kubepods-burstable-pod0a1b2c3d_4e5f_6789_abcd_ef0123456789.slice"

PATHS = [
    # Docker: cgroupfs driver, systemd driver, Docker in Docker (the innermost).
    (f"/docker/{ID}", ID),
    (f"/system.slice/docker-{ID}.scope", ID),
    (f"/docker/{OTHER}/docker/{ID}", ID),
    # Kubernetes (containerd's CRI, CRI-O, dockershim), systemd and cgroupfs drivers.
    (f"/kubepods.slice/kubepods-burstable.slice/{POD_SYSTEMD}/cri-containerd-{ID}.scope", ID),
    (f"/kubepods.slice/{POD_SYSTEMD.replace('burstable-', '')}/crio-{ID}.scope", ID),
    (f"/kubepods.slice/kubepods-besteffort.slice/x.slice/docker-{ID}.scope", ID),
    (f"/kubepods/burstable/{POD}/{ID}", ID),
    (f"/kubepods/{POD}/{ID}", ID),
    (f"/kubepods.slice/kubepods-burstable.slice/{POD_SYSTEMD}/crio-conmon-{ID}.scope", None),
    # Podman: rootful, rootless, cgroupfs manager, systemd inside; conmon is no container.
    (f"/machine.slice/libpod-{ID}.scope", ID),
    (f"/machine.slice/libpod-{ID}.scope/container", ID),
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope", ID),
    (f"/libpod_parent/libpod-{ID}", ID),
    (f"/machine.slice/libpod-conmon-{ID}.scope", None),
    # systemd-nspawn: the machine's name, unescaped; a container inside one.
    ("/machine.slice/machine-web.scope", "web"),
    ("/machine.slice/machine-my\\x2dbox.scope/payload", "my-box"),
    ("/machine.slice/systemd-nspawn@web.service/payload", "web"),  # machinectl start
    (f"/machine.slice/machine-web.scope/payload/system.slice/docker-{ID}.scope", ID),
    # No container.
    ("/", None),
    ("/user.slice/user-1000.slice/session-3.scope", None),
    ("/system.slice/docker.service", None),
    ("/system.slice/containerd.service", None),
    ("/init.scope", None),
    # Odd names: not 64 hex, upper case, too long, outside the parents that name ids.
    (f"/system.slice/docker-{ID[:-1]}.scope", None),
    (f"/system.slice/docker-{ID.upper()}.scope", None),
    (f"/system.slice/docker-{ID}0.scope", None),
    (f"/system.slice/docker-{ID}.scope.bak", None),
    (f"/user.slice/{ID}", None),
    (f"/docker/{ID}:0::/docker/{OTHER}", OTHER),  # a colon is any other byte
    ("/machine.slice/machine-.scope", None),
    ("/machine.slice/machine-a\\x2fb.scope", None),  # "/" in a name
    ("/machine.slice/machine-a\\x0ab.scope", None),  # a newline in a name
    ("/machine.slice/machine-\u00e9t\u00e9.scope", None),
    ("/machine.slice/machine-" + "x" * 65 + ".scope", None),
    ("/user.slice/machine-web.scope", None),  # not under machine.slice
    ("//docker//" + ID + "//", ID),
    ("\ufffd/docker\ufffd/" + ID, None),
    ("", None),
]


@pytest.mark.parametrize(("path", "expected"), PATHS)
def test_container_of_path(path, expected):
    assert container_of_path(path) == expected


def v1_lines(path: str) -> str:
    return f"12:pids:{path}\n4:memory:{path}\n1:name=systemd:{path}\n"


def test_unified_line_is_read_first():
    text = v1_lines(f"/docker/{OTHER}") + f"0::/system.slice/docker-{ID}.scope\n"
    assert container_id(text) == ID


def test_v1_lines_answer_when_the_unified_one_names_no_container():
    # A hybrid host with Docker's cgroupfs driver: the unified line shows the runtime's.
    assert container_id(v1_lines(f"/docker/{ID}") + "0::/system.slice/containerd.service\n") == ID
    assert container_id(v1_lines(f"/docker/{ID}")) == ID  # no unified line at all
    assert container_id(v1_lines("/") + "0::/\n") is None


def test_colons_in_a_path_stay_in_the_path():
    assert container_id(f"0::/odd:name/docker-{ID}.scope\n") == ID
    assert container_id(f"4:memory:/a:b:c/docker/{ID}\n0::/\n") == ID


@pytest.mark.parametrize(
    "text",
    ["", "\n\n", "garbage", "0:", "0::", "::::", "0::" + "/a" * 5000, "\x00" * 100, "0::\udcff"],
)
def test_malformed_cgroup_text_is_no_container(text):
    assert container_id(text) is None


def test_read_container_id_of_a_gone_process_is_none(tmp_path):
    assert read_container_id(1, str(tmp_path)) is None


def test_container_values_match_a_full_id_or_a_long_enough_prefix():
    assert container_matches(ID, ID)
    assert container_matches(ID[:12], ID)
    assert not container_matches(ID[:11], ID)
    assert not container_matches(ID[:12], OTHER)
    assert container_matches("web", "web")  # a machine's full name
    assert not container_matches("we", "web")
    assert not container_matches(ID + "0", ID)


def test_container_filter_reports_unmatched_and_ambiguous_values():
    twin = ID[:12] + "0" * 52
    wanted = ContainerFilter([ID[:12], "web", OTHER[:5]])
    assert [wanted.matches(c) for c in (ID, twin, OTHER, "web", None)] == [
        True,
        True,
        False,
        True,
        False,
    ]
    assert wanted.unmatched() == (OTHER[:5],)
    assert wanted.ambiguous() == {ID[:12]: tuple(sorted((ID, twin)))}


def test_child_in_a_docker_like_cgroup_has_that_container_id():
    with docker_like_cgroup() as (scope, container):
        child = subprocess.Popen(["cat"], stdin=subprocess.PIPE)
        try:
            before = read_container_id(child.pid)
            join_cgroup(scope, child.pid)
            with open(f"/proc/{child.pid}/cgroup", "rb") as handle:
                text = handle.read().decode(errors="replace")
            assert f"/system.slice/docker-{container}.scope" in text
            assert read_container_id(child.pid) == container
        finally:
            child.stdin.close()
            child.wait()
    assert before != container  # None, unless the tests themselves run in a container


def test_namespace_representative_in_a_docker_like_cgroup_has_its_container():
    with docker_like_cgroup() as (scope, container):
        child = start_netns_child()
        try:
            join_cgroup(scope, child.pid)
            representative = NamespaceDiscovery().scan()[netns_inode(child.pid)]
            assert representative == child.pid
            assert read_container_id(representative) == container
        finally:
            child.stop()
