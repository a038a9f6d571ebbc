"""Inventory: entries, the hosts file, Slurm node lists and the resolution order."""

from __future__ import annotations

import pytest

from tasks.lib.inventory import (
    HostSpec,
    InventoryError,
    expand_slurm_nodelist,
    parse_host_entry,
    parse_hosts_file_text,
    render_hosts_file,
    resolve_inventory,
)


@pytest.mark.parametrize(
    "entry,expected",
    [
        ("gpu01", HostSpec("gpu01")),
        ("10.0.0.1", HostSpec("10.0.0.1")),
        ("alice@gpu01", HostSpec("gpu01", "alice")),
        ("alice@gpu01:2222", HostSpec("gpu01", "alice", 2222)),
        ("gpu01:22", HostSpec("gpu01", None, 22)),
        ("  node-a.cluster.local  ", HostSpec("node-a.cluster.local")),
        ({"host": "gpu02", "user": "bob", "port": 2200}, HostSpec("gpu02", "bob", 2200)),
        ({"host": "gpu02"}, HostSpec("gpu02")),
    ],
)
def test_parse_host_entry(entry, expected):
    assert parse_host_entry(entry) == expected


@pytest.mark.parametrize(
    "entry,message",
    [
        ("", "empty host entry"),
        ("   ", "empty host entry"),
        ("gpu01:0", "bad port"),
        ("gpu01:70000", "bad port"),
        ("a b", "malformed host"),
        ("user@", "malformed host"),
        ("@host", "malformed host"),
        ("host:", "malformed host"),
        ("host;rm -rf /", "malformed host"),
        ("[not-v6]:22", "malformed host"),
        ("[12345::zz]", "malformed host"),
        ("[10.0.0.1]", "malformed host"),
        # IPv6 reaches a node over SSH, but check and launch reach the master over IPv4 only.
        ("[::1]:22", "'\\[::1\\]:22' is an IPv6 address: not supported"),
        ("root@[::1]", "is an IPv6 address: not supported"),
        ("[fe80::1%eth0]", "is an IPv6 address: not supported"),
        ("::1", "'::1' is an IPv6 address: not supported"),
        ("fe80::1%eth0", "is an IPv6 address: not supported"),
        ({"host": "::1"}, "is an IPv6 address: not supported"),
        (42, "neither a string nor a mapping"),
        ({"user": "x"}, "has no 'host'"),
        ({"host": "a", "password": "x"}, "unknown key"),
        ({"host": "a@b"}, "put user/port in their own keys"),
        ({"host": "a", "port": "22"}, "bad port"),
        ({"host": "a", "port": True}, "bad port"),
        ({"host": "a", "user": "bad user"}, "bad user"),
    ],
)
def test_parse_host_entry_rejects(entry, message):
    with pytest.raises(InventoryError, match=message):
        parse_host_entry(entry)


def test_labels_parse_back_to_the_same_host():
    for spec in [
        HostSpec("a"),
        HostSpec("a", "u"),
        HostSpec("a", "u", 2222),
    ]:
        assert parse_host_entry(spec.label) == spec


def test_hosts_file_comments_blank_lines_and_line_numbers():
    text = "# cluster\n\nmaster  # node 0\n  worker1\nroot@worker2:2222\r\n"
    assert parse_hosts_file_text(text, "f") == [
        HostSpec("master"),
        HostSpec("worker1"),
        HostSpec("worker2", "root", 2222),
    ]
    with pytest.raises(InventoryError, match=r"f:3: malformed host"):
        parse_hosts_file_text("a\n\nb c\n", "f")


def test_render_hosts_file_round_trips():
    specs = [HostSpec("m"), HostSpec("w", "u", 2200), HostSpec("10.0.0.2", None, 22)]
    text = render_hosts_file(specs, "written by setup\nmaster first")
    assert text.startswith("# written by setup\n# master first\n")
    assert parse_hosts_file_text(text, "x") == specs


def test_slurm_nodelist_expansion_keeps_order():
    assert [h.host for h in expand_slurm_nodelist("gpu[01-03,07],cpu1")] == [
        "gpu01",
        "gpu02",
        "gpu03",
        "gpu07",
        "cpu1",
    ]
    with pytest.raises(InventoryError, match="cannot be expanded"):
        expand_slurm_nodelist("gpu[01-")


def test_resolution_order(tmp_path):
    hosts_file = tmp_path / "node_ip_list.txt"
    slurm = {"SLURM_JOB_NODELIST": "s[1-2]"}
    # Nothing anywhere: this machine alone, without SSH.
    local = resolve_inventory([], hosts_file, {})
    assert local.is_local and local.source == "local" and local.master.local
    # Slurm when there is neither config nor file.
    assert [h.host for h in resolve_inventory([], hosts_file, slurm).hosts] == ["s1", "s2"]
    hosts_file.write_text("f1\nf2\n")
    from_file = resolve_inventory([], hosts_file, slurm)
    assert [h.host for h in from_file.hosts] == ["f1", "f2"] and from_file.source == str(hosts_file)
    from_config = resolve_inventory(["c1", {"host": "c2"}], hosts_file, slurm)
    assert [h.host for h in from_config.hosts] == ["c1", "c2"] and not from_config.is_local
    assert from_config.master == HostSpec("c1")


def test_resolution_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(InventoryError, match="lists no host"):
        resolve_inventory([], empty, {})
    with pytest.raises(InventoryError, match="listed twice"):
        resolve_inventory(["a", "u@A"], None, {})
    # python-hostlist drops repeats itself; allocation order is kept.
    assert [
        h.host for h in resolve_inventory([], None, {"SLURM_JOB_NODELIST": "n2,n1,n2"}).hosts
    ] == ["n2", "n1"]
    # Same host on two ports is two nodes (several sshd containers on one machine).
    assert len(resolve_inventory(["a:2201", "a:2202"], None, {}).hosts) == 2
    directory = tmp_path / "dir"
    directory.mkdir()
    with pytest.raises(InventoryError, match="cannot read hosts file"):
        resolve_inventory([], directory, {})


# -- the same node listed twice --------------------------------------------------------------------


def addresses(table):
    """A resolver answering from `table` (name -> addresses); other names do not resolve."""
    return lambda names: {name: table[name] for name in names if name in table}


@pytest.mark.parametrize("hosts,message", [
    (["127.0.0.1", "127.0.0.1:22"],
     "'127.0.0.1:22' is listed twice (as '127.0.0.1': same host, port 22)"),
    (["u@h", "h"], "'h' is listed twice (as 'u@h': same host, port 22)"),
    (["h", {"host": "H", "user": "x"}], "'x@H' is listed twice (as 'h': same host, port 22)"),
    (["gpu01", "10.0.0.1"], "'10.0.0.1' is listed twice (as 'gpu01': both are 10.0.0.1, port 22)"),
    (["10.0.0.1:2200", "gpu01:2200"], "'gpu01:2200' is listed twice (as '10.0.0.1:2200': both are"),
    (["gpu01", "alias"], "'alias' is listed twice (as 'gpu01': both are 10.0.0.1, port 22)"),
])
def test_the_same_node_under_two_spellings_is_refused(hosts, message):
    resolve = addresses({"gpu01": ["10.0.0.1"], "alias": ["10.0.0.9", "10.0.0.1"]})
    with pytest.raises(InventoryError) as raised:
        resolve_inventory(hosts, None, {}, resolve=resolve)
    assert message in str(raised.value) and "each node must appear once" in str(raised.value)


def test_different_ports_or_unresolved_names_are_different_nodes():
    resolve = addresses({"gpu01": ["10.0.0.1"]})
    def count(hosts, **options):
        return len(resolve_inventory(hosts, None, {}, **options).hosts)

    assert count(["gpu01:2201", "10.0.0.1:2202"], resolve=resolve) == 2
    assert count(["gpu01", "gpu02", "10.0.0.2"], resolve=resolve) == 3
    # A port left out is the one Connection would use: the config's (or ~/.ssh/config's).
    assert count(["h", "h:22"], default_port=lambda host: 2222) == 2
    with pytest.raises(InventoryError, match="port 2222"):
        resolve_inventory(["h", "h:2222"], None, {}, default_port=lambda host: 2222)


def test_only_names_are_resolved():
    asked = []

    def resolve(names):
        asked.extend(names)
        return {}
    resolve_inventory(["b", "10.0.0.1", "a", "u@b:2200"], None, {}, resolve=resolve)
    assert asked == ["a", "b"]
