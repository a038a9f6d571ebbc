"""The probe: its script run by a real sh on this machine, its parsers and its judgement."""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tasks.lib.probe import (
    SECTION_MARK,
    CheckoutState,
    GpuProcess,
    HostFacts,
    checkout_mismatch,
    gpu_busy_message,
    judge_cluster,
    judge_host,
    mismatch_hint,
    parse_addresses,
    parse_gpu_processes,
    parse_gpus,
    parse_probe_output,
    parse_route,
    probe_input,
    probe_script,
    resolve_master_side,
    route_from_proc,
    sh_command,
)

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture
def repo(tmp_path) -> Path:
    root = tmp_path / "checkout"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "a.py").write_text("print(1)\n")
    git(root, "add", "a.py")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    return root


def run_probe(workdir: Path, **kwargs) -> HostFacts:
    master = kwargs.pop("master", "localhost")
    port = kwargs.pop("master_port", None)
    options = {"check_port": port is not None, "container": None, "venv": None, **kwargs}
    script = probe_script(master, str(workdir), **options)
    # Through a login-shell-like layer, as Fabric does: sh_command wraps it for sh. The port
    # comes on stdin, as probe_all sends it.
    result = subprocess.run(
        ["bash", "-c", sh_command(script)], capture_output=True, text=True, timeout=60,
        input=probe_input(port).decode() if port is not None else "",
    )
    assert result.returncode == 0, result.stderr
    return parse_probe_output(3, "label", result.stdout)


def test_probe_on_this_machine_reports_git_state(repo):
    facts = run_probe(repo)
    assert facts.node_index == 3 and facts.label == "label"
    assert facts.hostname == socket.gethostname()
    assert facts.branch == "main" and facts.commit == git(repo, "rev-parse", "HEAD")
    assert facts.dirty is False and facts.has_git and facts.workdir_exists
    assert facts.ifname == "lo" and facts.address == "127.0.0.1" and facts.master_ip == "127.0.0.1"
    assert ("lo", "127.0.0.1") in facts.interfaces
    assert facts.shm_bytes and facts.shm_bytes > 0
    assert "python3" in facts.tools
    assert facts.port_free is None and facts.docker_engine is None and facts.container_state is None
    assert facts.notes == ()
    clean_diff = facts.diff_hash
    (repo / "a.py").write_text("print(2)\n")
    dirty = run_probe(repo)
    assert dirty.dirty is True and dirty.diff_hash != clean_diff
    # Untracked files do not make a checkout dirty (setup writes node_ip_list.txt, for one).
    (repo / "a.py").write_text("print(1)\n")
    (repo / "new.txt").write_text("x")
    assert run_probe(repo).dirty is False


def test_probe_of_missing_workdir_and_plain_directory(tmp_path):
    missing = run_probe(tmp_path / "nope")
    assert not missing.workdir_exists and missing.commit is None and not missing.has_git
    plain = run_probe(tmp_path)
    assert plain.workdir_exists and plain.commit is None and plain.tree_hash is None


def test_probe_tools_include_the_venv(tmp_path):
    venv = tmp_path / "venv with space"
    (venv / "bin").mkdir(parents=True)
    tool = venv / "bin" / "rocprofv3"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert "rocprofv3" in run_probe(tmp_path, venv=str(venv)).tools
    assert "rocprofv3" not in run_probe(tmp_path, venv=str(tmp_path / "absent")).tools


def test_probe_master_port_free_or_busy(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        busy = run_probe(tmp_path, master_port=port)
        assert busy.port_free is False
        # Who holds it: this process, as the kernel's socket table and /proc name it.
        me = f"uid {os.getuid()} ({pwd.getpwuid(os.getuid()).pw_name}), pid {os.getpid()}: "
        assert len(busy.port_holders) == 1 and busy.port_holders[0].startswith(me), busy
        assert sys.executable.split("/")[-1] in busy.port_holders[0]
        assert any(f"master port is in use (held by {me}" in e
                   for e in errors(judge(replace(busy, node_index=0)))), busy
    finally:
        listener.close()
    free = run_probe(tmp_path, master_port=port)
    assert free.port_free is True and free.port_holders == ()
    with pytest.raises(ValueError):
        probe_input(70000)
    # The port is never part of the script (an argv on the node).
    assert str(port) not in probe_script("m", "/w", check_port=True, container=None, venv=None)


def test_hostile_master_and_workdir_arrive_literally(tmp_path):
    hostile = tmp_path / "w $(touch pwned) 'q'"
    hostile.mkdir()
    facts = run_probe(hostile, master="$(touch pwned2)")
    assert facts.workdir_exists and facts.ifname is None and facts.master_ip is None
    assert not list(Path.cwd().glob("pwned*")) and not list(tmp_path.glob("pwned*"))


def plant_fsmonitor(repo: Path, marker: Path) -> None:
    """core.fsmonitor names a program that git runs for `git status`: here one leaving a mark."""
    hook = repo / ".git" / "fsmonitor-hook"
    hook.write_text(f"#!/bin/sh\ntouch {marker}\n")
    hook.chmod(0o755)
    git(repo, "config", "core.fsmonitor", str(hook))


def foreign_user() -> tuple[int, str]:
    """A uid that is not ours, and the name the probe must report for it."""
    import pwd

    try:
        entry = pwd.getpwnam("gemm-probe-test")
        return entry.pw_uid, entry.pw_name
    except KeyError:
        return 65533, "uid 65533"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
@pytest.mark.parametrize("foreign", ["checkout", ".git"])
def test_another_users_checkout_is_reported_and_its_config_never_runs(repo, tmp_path, foreign):
    marker = tmp_path / "fsmonitor-ran"
    plant_fsmonitor(repo, marker)
    uid, name = foreign_user()
    owned = [repo] if foreign == "checkout" else []
    owned += [p for p in (repo / ".git").rglob("*")] + [repo / ".git"]
    for path in owned:
        os.lchown(path, uid, -1)
    facts = run_probe(repo)
    assert not marker.exists()
    assert facts.checkout_owner == name
    assert facts.commit is None and not facts.has_git
    found = errors(judge(facts, workdir=str(repo)))
    assert len(found) == 1 and found[0].startswith(f"checkout owned by {name}: git is not run")
    assert "set cluster.workdir" in found[0] and "chown" in found[0]
    # fab launch and the checkout check of other tasks say the same.
    assert checkout_mismatch(facts, LOCAL).startswith(f"checkout owned by {name}")


def test_git_in_our_own_checkout_runs_no_fsmonitor_whatever_its_config(repo, tmp_path):
    marker = tmp_path / "fsmonitor-ran"
    plant_fsmonitor(repo, marker)
    (repo / "a.py").write_text("print(2)\n")
    facts = run_probe(repo)
    assert facts.checkout_owner is None and facts.has_git and facts.dirty is True
    assert not marker.exists()


# -- parsers --------------------------------------------------------------------------------------


def test_parse_route_variants():
    assert parse_route("10.0.0.2 dev ens5 src 10.0.0.11 uid 0 \\    cache") == ("ens5", "10.0.0.11")
    assert parse_route("10.9.0.5 via 10.0.0.1 dev ib0 src 10.0.0.11 uid 0") == ("ib0", "10.0.0.11")
    assert parse_route("local 10.0.0.10 dev lo table local src 10.0.0.10 uid 0") == (
        "lo",
        "10.0.0.10",
    )
    assert parse_route("RTNETLINK answers: Network is unreachable") == (None, None)
    assert parse_route("") == (None, None)


def test_parse_addresses():
    text = (
        "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n"
        "7: ens5@if8    inet 10.0.0.11/24 brd 10.0.0.255 scope global ens5\\ valid_lft forever\n"
        "garbage\n"
    )
    assert parse_addresses(text) == (("lo", "127.0.0.1"), ("ens5", "10.0.0.11"))


NVIDIA_L = """\
GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0e5b2d8f-1111-2222-3333-444455556666)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1e5b2d8f-1111-2222-3333-444455556666)
  MIG 1g.10gb     Device  0: (UUID: MIG-aaaa)
"""
ROCM_CSV = (
    "device,Card Series,Card Model,Card Vendor,Card SKU,Subsystem ID,Device Rev,Node ID,GUID,"
    "GFX Version\n"
    "card0,AMD Instinct MI300X OAM,0x74a1,Advanced Micro Devices Inc. [AMD/ATI],M3000100,0x74a1,"
    "0x00,2,28851,gfx942\n"
    "card1,AMD Instinct MI300X OAM,0x74a1,Advanced Micro Devices Inc. [AMD/ATI],M3000100,0x74a1,"
    "0x00,3,51499,gfx942\n"
)


@pytest.mark.parametrize(
    "nvidia,rocm,kfd,expected",
    [
        (NVIDIA_L, "", "", ("nvidia", 2, ("NVIDIA H100 80GB HBM3",) * 2)),
        ("", ROCM_CSV, "", ("amd", 2, ("AMD Instinct MI300X OAM",) * 2)),
        ("", "", "0\n53896\n4112\n", ("amd", 2, ("AMD GPU", "AMD GPU"))),
        (
            "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.",
            "",
            "",
            ("none", 0, ()),
        ),
        ("", "", "0\n", ("none", 0, ())),
    ],
)
def test_parse_gpus(nvidia, rocm, kfd, expected):
    assert parse_gpus(nvidia, rocm, kfd) == expected


def section_text(**sections: str) -> str:
    return "".join(f"\n{SECTION_MARK}{name}\n{body}\n" for name, body in sections.items())


@pytest.mark.parametrize(
    "docker,engine,state,error",
    [
        ("engine=24.0.5\nstate=running", "24.0.5", "running", None),
        (
            "engine=26.1.0+dfsg1\nstate=Error: No such object: training-overlap ",
            "26.1.0+dfsg1",
            "absent",
            None,
        ),
        ("engine=24.0.5\nstate=exited", "24.0.5", "exited", None),
        (
            "engine=Cannot connect to the Docker daemon at unix:///var/run/docker.sock. \nstate=x",
            None,
            None,
            "Cannot connect to the Docker daemon at unix:///var/run/docker.sock.",
        ),
        ("docker=missing", None, None, "docker is not installed (not on PATH)"),
        (
            "engine=permission denied while trying to connect \nstate=",
            None,
            None,
            "permission denied while trying to connect",
        ),
    ],
)
def test_parse_docker_section(docker, engine, state, error):
    facts = parse_probe_output(0, "x", section_text(hostname="h", docker=docker, end=""))
    assert (facts.docker_engine, facts.container_state, facts.docker_error) == (
        engine,
        state,
        error,
    )


@pytest.mark.parametrize(
    "docker,compose,container_id",
    [
        ("engine=24.0.5\nstate=running\ncompose=v2\nid=" + "c" * 64, "v2", "c" * 64),
        ("engine=24.0.5\nstate=Error: No such object: x\ncompose=v1\nid=", "v1", None),
        ("docker=missing", None, None),
        ("", None, None),  # Docker not asked
    ],
)
def test_parse_docker_section_for_docker_up(docker, compose, container_id):
    facts = parse_probe_output(0, "x", section_text(hostname="h", docker=docker, end=""))
    assert (facts.docker_compose, facts.container_id) == (compose, container_id)


def test_cut_short_output_is_noted_and_garbage_git_is_not_a_commit():
    facts = parse_probe_output(
        0, "x", section_text(hostname="h", git="branch=fatal: x\ncommit=fatal: x")
    )
    assert facts.commit is None and not facts.has_git
    assert any("cut short" in note for note in facts.notes)
    assert any("git failed" in note for note in facts.notes)


def test_sync_record_only_counts_when_the_recomputed_hash_matches():
    record = json.dumps(
        {"tree_hash": "f" * 64, "branch": "main", "commit": COMMIT_A, "dirty": True}
    )
    synced = parse_probe_output(
        0, "x", section_text(sync_record=record, sync_hash="f" * 64, end="")
    )
    assert synced.synced and synced.commit == COMMIT_A and synced.branch == "main" and synced.dirty
    edited = parse_probe_output(
        0, "x", section_text(sync_record=record, sync_hash="e" * 64, end="")
    )
    assert not edited.synced and edited.commit is None and edited.tree_hash == "e" * 64


# -- master address -------------------------------------------------------------------------------


def facts(index: int = 0, **overrides) -> HostFacts:
    base = HostFacts(
        node_index=index,
        label=f"n{index}",
        hostname=f"host{index}",
        address=f"10.0.0.{10 + index}",
        ifname="eth0",
        gpu_vendor="none",
        gpu_count=0,
        gpu_names=(),
        branch="main",
        commit=COMMIT_A,
        dirty=False,
        tree_hash=None,
        docker_engine=None,
        container_state=None,
        shm_bytes=8 << 30,
        tools=frozenset(),
        port_free=None,
        master_ip="10.0.0.10",
        interfaces=(("lo", "127.0.0.1"), ("eth0", f"10.0.0.{10 + index}")),
        has_git=True,
        diff_hash="d",
    )
    return replace(base, **overrides)


def test_master_on_debian_loopback_alias_gets_the_workers_view():
    master = facts(
        0,
        address="127.0.0.1",
        ifname="lo",
        master_ip="127.0.1.1",
        interfaces=(("lo", "127.0.0.1"), ("ens5", "10.0.0.10")),
    )
    fixed = resolve_master_side([master, facts(1), facts(2)])
    assert (fixed[0].address, fixed[0].ifname) == ("10.0.0.10", "ens5")
    assert fixed[1:] == [facts(1), facts(2)]


def test_master_fix_up_leaves_good_or_unfixable_facts_alone():
    good = [facts(0), facts(1)]
    assert resolve_master_side(good) == good
    alone = [facts(0, ifname="lo", address="127.0.0.1")]
    assert resolve_master_side(alone) == alone  # one node: lo is right
    unknown = [facts(0, ifname="lo", address="127.0.0.1"), facts(1, master_ip="192.168.9.9")]
    assert resolve_master_side(unknown) == unknown


# -- judgement ------------------------------------------------------------------------------------

LOCAL = CheckoutState("main", COMMIT_A, False, "t" * 64, "d")


def judge(f: HostFacts, local: CheckoutState = LOCAL, **kwargs):
    options = {"workdir": "/srv/w", "nproc": 8, "docker_enabled": False, **kwargs}
    return judge_host(f, local=local, **options)


def errors(found) -> list[str]:
    return [x.message for x in found if x.is_error]


def warnings(found) -> list[str]:
    return [x.message for x in found if not x.is_error]


def test_clean_cpu_node_passes():
    assert judge(facts(1)) == []


def test_checkout_state_unpacks_as_the_four_tuple():
    branch, commit, dirty, tree_hash = LOCAL
    assert (branch, commit, dirty, tree_hash) == ("main", COMMIT_A, False, "t" * 64)


def test_checkout_mismatches_are_errors_with_a_fix():
    found = judge(facts(1, commit=COMMIT_B))
    assert errors(found) == [
        f"checkout differs from this one (commit {COMMIT_B[:12]} != {COMMIT_A[:12]}): "
        "run `fab sync`, or on that host: "
        "git -C /srv/w fetch && git -C /srv/w checkout main && git -C /srv/w pull"
    ]
    assert "branch dev != main" in errors(judge(facts(1, branch="dev")))[0]
    # A detached HEAD on either side compares commits only.
    assert judge(facts(1, branch="HEAD")) == []
    assert judge(facts(1), local=CheckoutState("HEAD", COMMIT_A, False, None, "d")) == []
    assert (
        "neither a git checkout nor"
        in errors(judge(facts(1, commit=None, branch=None, has_git=False)))[0]
    )
    assert (
        "changed since the last sync" in errors(judge(facts(1, commit=None, tree_hash="x" * 64)))[0]
    )
    assert "does not exist" in errors(judge(facts(1, workdir_exists=False)))[0]


@pytest.mark.parametrize("detached", [False, True])
def test_mismatch_hint_runs_from_any_directory_and_updates_the_workdir(repo, tmp_path, detached):
    workdir = tmp_path / "node w'dir"
    subprocess.run(["git", "clone", "-q", str(repo), str(workdir)], check=True)
    old = git(workdir, "rev-parse", "HEAD")
    (repo / "a.py").write_text("print(2)\n")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-am", "two")
    new = git(repo, "rev-parse", "HEAD")
    local = CheckoutState("HEAD" if detached else "main", new, False, None, "d")
    hint = mismatch_hint(facts(1, commit=old), local, str(workdir))
    command = hint.split("on that host: ", 1)[1]
    elsewhere = tmp_path / "not-a-repo"
    elsewhere.mkdir()
    done = subprocess.run(["sh", "-c", command], cwd=elsewhere, capture_output=True, text=True)
    assert done.returncode == 0, (command, done.stderr)
    assert git(workdir, "rev-parse", "HEAD") == new
    assert ("pull" in command) is not detached  # a detached checkout has no branch to pull


def test_same_content_matches_whatever_git_says():
    assert checkout_mismatch(facts(1, commit=COMMIT_B, tree_hash="t" * 64), LOCAL) is None
    assert checkout_mismatch(facts(1, commit=COMMIT_B), LOCAL) is not None
    assert (
        checkout_mismatch(facts(1, commit=COMMIT_B), CheckoutState(None, None, None, None)) is None
    )


def test_uncommitted_changes_are_warnings_only_when_they_differ():
    dirty_local = CheckoutState("main", COMMIT_A, True, "t" * 64, "d2")
    assert "uncommitted changes differ" in warnings(judge(facts(1), local=dirty_local))[0]
    # Shared checkout: the same diff on both sides.
    assert judge(facts(1, dirty=True, diff_hash="d2"), local=dirty_local) == []
    assert warnings(judge(facts(1, dirty=True, diff_hash="zz")))


@pytest.mark.parametrize(
    "overrides,nproc,ok",
    [
        ({"gpu_count": 4, "gpu_vendor": "nvidia"}, 8, False),
        ({"gpu_count": 8, "gpu_vendor": "nvidia"}, 8, True),
        ({"gpu_count": 4, "gpu_vendor": "amd"}, "auto", True),
        ({"gpu_count": 0}, 8, True),  # CPU-only: nproc is a process count, gloo runs anyway
    ],
)
def test_gpus_against_nproc(overrides, nproc, ok):
    assert (errors(judge(facts(1, **overrides), nproc=nproc)) == []) is ok


def test_docker_port_route_and_shm():
    assert (
        "Docker engine not usable: boom"
        in errors(judge(facts(1, docker_error="boom"), docker_enabled=True))[0]
    )
    assert warnings(
        judge(facts(1, docker_engine="24.0", container_state="absent"), docker_enabled=True)
    ) == ["container is absent: run `fab docker-up`"]
    assert (
        judge(facts(1, docker_engine="24.0", container_state="running"), docker_enabled=True) == []
    )
    assert "master port is in use" in errors(judge(facts(0, port_free=False)))[0]
    assert "no route to the master" in errors(judge(facts(1, ifname=None)))[0]
    # A forced interface replaces the route and must exist on the host.
    assert judge(facts(1, ifname=None), socket_ifname="eth0") == []
    assert "'ib0' has no IPv4 address" in errors(judge(facts(1), socket_ifname="ib0"))[0]
    assert "/dev/shm is only 64.0 MiB" in warnings(judge(facts(1, shm_bytes=64 << 20)))[0]
    # In a container, the container's shm_size counts, not the host's /dev/shm.
    assert (
        warnings(
            judge(
                facts(1, shm_bytes=64 << 20, docker_engine="24.0", container_state="running"),
                docker_enabled=True,
            )
        )
        == []
    )


def test_cluster_wide_judgement():
    assert judge_cluster([facts(0), facts(1)]) == []
    gpu = {"gpu_count": 8, "gpu_vendor": "nvidia"}
    mixed = judge_cluster([facts(0, **gpu), facts(1)])
    assert len(mixed) == 1 and mixed[0].is_error and "nodes 1 have no GPU" in mixed[0].message
    vendors = judge_cluster([facts(0, **gpu), facts(1, gpu_count=8, gpu_vendor="amd")])
    assert "mixed GPU vendors" in vendors[0].message
    twice = judge_cluster([facts(0), facts(1, hostname="host0")])
    assert not twice[0].is_error and "same hostname" in twice[0].message


PROC_ROUTE = (
    "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
    "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
    "ib0\t0000000A\t00000000\t0001\t0\t0\t100\t0000FFFF\t0\t0\t0\n"
    "ens5\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
    "ens6\t0000000A\t00000000\t0001\t0\t0\t5\t00FFFFFF\t0\t0\t0\n"
)


@pytest.mark.parametrize(
    "destination,ifname",
    [
        ("10.0.0.7", "ens5"),  # /24 beats /16; metric 0 beats 5
        ("10.0.9.7", "ib0"),  # only the /16
        ("8.8.8.8", "eth0"),  # default route
        ("not-an-ip", None),
    ],
)
def test_route_from_proc_without_iproute2(destination, ifname):
    assert route_from_proc(PROC_ROUTE, destination) == ifname
    assert route_from_proc(PROC_ROUTE.splitlines()[0], "10.0.0.7") is None


def test_probe_output_without_ip_uses_the_kernel_table():
    text = section_text(
        hostname="gpu",
        master_ip="10.0.0.7",
        route="sh: 12: ip: not found",
        addrs="sh: 13: ip: not found",
        proc_route=PROC_ROUTE,
        end="",
    )
    facts = parse_probe_output(1, "gpu", text)
    assert facts.ifname == "ens5" and facts.address is None and facts.interfaces == ()


# -- who holds the GPUs ---------------------------------------------------------------------------

# Recorded on an 8-GPU node: `nvidia-smi --query-compute-apps=pid,used_memory,process_name
# --format=csv,noheader,nounits` with two users' jobs (the probe adds each pid's owner).
NVIDIA_COMPUTE_APPS = "4242, 40536, /usr/bin/python3\n4343, 1024, /opt/conda/bin/python train.py\n"


def test_the_probe_names_who_holds_the_gpus(repo, tmp_path):
    """The probe's own shell turns the driver's list into "pid owner MiB name" lines: replayed
    here from a recorded nvidia-smi answer, with this machine's pids so owners resolve."""
    holder = subprocess.Popen(["sleep", "60"])
    try:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        recorded = NVIDIA_COMPUTE_APPS.replace("4242", str(holder.pid))
        tool = bin_dir / "nvidia-smi"
        tool.write_text("#!/bin/sh\ncase \"$*\" in *query-compute-apps*) printf '%s' "
                        f"'{recorded}';; *) exit 0;; esac\n")
        tool.chmod(0o755)
        env_path = f"{bin_dir}:{os.environ['PATH']}"
        script = probe_script("localhost", str(repo), check_port=False, container=None, venv=None)
        result = subprocess.run(["bash", "-c", sh_command(script)], capture_output=True,
                                text=True, timeout=60, env={**os.environ, "PATH": env_path})
        found = parse_probe_output(0, "n", result.stdout)
    finally:
        holder.kill()
        holder.wait()
    import pwd

    me = pwd.getpwuid(os.getuid()).pw_name
    assert found.uid == os.getuid() and found.user == me
    assert found.gpu_processes[0] == GpuProcess(holder.pid, me, 40536, "/usr/bin/python3")
    assert found.gpu_processes[1].pid == 4343 and found.gpu_processes[1].memory_mib == 1024


def test_gpus_held_by_another_user_are_a_warning_naming_owner_and_pid():
    held = replace(facts(), user="alice", gpu_processes=(
        GpuProcess(4242, "bob", 40536, "python3"), GpuProcess(77, "alice", None, "")))
    found = judge(held)
    assert not errors(found)
    [warning] = [x.message for x in found if not x.is_error and "GPU" in x.message]
    assert warning == ("GPU(s) in use by pid 4242 (bob, python3, 40536 MiB); pid 77 (yours): "
                       "a run here shares them (slower GEMMs, less memory)")
    assert gpu_busy_message(replace(held, gpu_processes=())) is None


def test_gpu_process_lines_that_do_not_parse_are_skipped():
    assert parse_gpu_processes("x y z\n12 ? - \n\n99 carol 12 a b c\n") == (
        GpuProcess(12, "?", None, ""), GpuProcess(99, "carol", 12, "a b c"))


def test_a_checkout_that_is_this_one_is_not_compared():
    """This machine alone: its workdir is this checkout, git or not (an unpacked archive)."""
    unpacked = facts(0, branch=None, commit=None, tree_hash=None, has_git=False)
    no_git = CheckoutState(None, None, None, None)
    assert "neither a git checkout" in errors(judge(unpacked, local=no_git))[0]
    assert errors(judge(unpacked, local=no_git, compare_checkout=False)) == []
    # A missing workdir is still an error.
    assert errors(judge(replace(unpacked, workdir_exists=False), local=no_git,
                        compare_checkout=False))
