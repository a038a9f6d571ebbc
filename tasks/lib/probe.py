"""One shell script per host that reports everything a preflight needs, and its interpretation.

`probe_script` builds a POSIX sh script (one SSH round trip per host) that prints raw command
output in named sections; `parse_probe_output` turns that text into `HostFacts`;
`resolve_master_side` fixes the master's own address with what the workers resolved; `judge_host`
and `judge_cluster` turn facts into errors (block a launch) and warnings (do not).

Raw output is parsed here rather than in shell so every interpretation is unit-tested.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from tasks.lib.containers import COMPOSE_VARIANT_SH, DOCKER_MISSING
from tasks.lib.ports import PORT_HOLDERS_SH, held_by, parse_port_holders
from tasks.lib.quoting import section_function, sh_command, sh_quote, split_sections

SECTION_MARK = "@@gemm-probe "
SYNC_RECORD = ".gemm-sync.json"  # written by `fab sync`: where the tree came from + its hash
SYNC_FILES = ".gemm-sync.files"  # NUL-separated, sorted list of the files sync wrote
TOOLS = (
    "rocprofv3",
    "nsys",
    "py-spy",
    "docker",
    "docker-compose",
    "torchrun",
    "python3",
    "rocm-smi",
    "nvidia-smi",
)
MIN_SHM_BYTES = 1 << 30  # NCCL/RCCL shared-memory transport and DataLoader workers want more
# Before every git command we run, in a node's checkout or the controller's: no fsmonitor and no
# hooks, whatever a config file says (an empty core.fsmonitor is "off" for every git version).
GIT_SAFE_OPTIONS = ("-c", "core.fsmonitor=", "-c", "core.hooksPath=/dev/null")
# The uncommitted-changes hash, the same on both sides; no external diff or textconv program.
GIT_DIFF_OPTIONS = ("diff", "--no-ext-diff", "--no-textconv", "HEAD", "--binary", "--full-index")

_NVIDIA_LINE = re.compile(r"^GPU (\d+): (.+?)(?: \(UUID: [^)]*\))?$")


@dataclass(frozen=True)
class HostFacts:
    """What one host reported. None means "not known" (tool missing, not asked, failed)."""

    node_index: int
    label: str
    hostname: str
    address: str | None  # source address toward the master; on the master: its own address
    ifname: str | None  # the interface that routes to the master, resolved on this host
    gpu_vendor: str  # "nvidia" | "amd" | "none"
    gpu_count: int
    gpu_names: tuple[str, ...]
    branch: str | None
    commit: str | None
    dirty: bool | None
    tree_hash: str | None  # content hash of the files `fab sync` wrote, recomputed on the host
    docker_engine: str | None
    container_state: str | None  # "running" | "exited" | "absent" | docker's word | None
    shm_bytes: int | None
    tools: frozenset[str]
    port_free: bool | None  # the master port is free (master only)
    port_holders: tuple[str, ...] = ()  # who listens on it, when busy (tasks/lib/ports.py)
    # Beyond the shared contract: what the judgement and the master fix-up need.
    master_ip: str | None = None  # the master's address as this host resolves it
    interfaces: tuple[tuple[str, str], ...] = ()  # (ifname, IPv4) pairs of this host
    workdir_exists: bool = True
    has_git: bool = False  # workdir is a git checkout (and git ran)
    synced: bool = False  # branch/commit come from a valid `fab sync` record
    diff_hash: str | None = None  # sha256 of `git diff HEAD --binary --full-index`
    docker_error: str | None = None  # docker's own message when the engine did not answer
    docker_compose: str | None = None  # "v2" | "v1" | "none"; None: Docker not asked or missing
    container_id: str | None = None  # the container's full id; None when absent or not asked
    notes: tuple[str, ...] = ()  # parse-time oddities, shown as warnings
    # Another user owns the workdir, its .git or .git/config: git was not run there.
    checkout_owner: str | None = None
    uid: int | None = None  # who we are on this host: its per-user run registry
    user: str | None = None
    gpu_processes: tuple[GpuProcess, ...] = ()  # compute processes on this host's GPUs, anyone's


@dataclass(frozen=True)
class GpuProcess:
    """A process holding a GPU of the host, as the driver lists it (nvidia-smi or AMD's KFD)."""

    pid: int
    user: str            # its owner's name ("?" when the process is already gone)
    memory_mib: int | None
    name: str


@dataclass(frozen=True)
class CheckoutState:
    """The controller's checkout, the reference every node is compared with.

    Unpacks as `branch, commit, dirty, tree_hash = local_checkout_state()`.
    """

    branch: str | None
    commit: str | None
    dirty: bool | None
    tree_hash: str | None
    diff_hash: str | None = None  # sha256 of `git diff HEAD --binary --full-index`

    def __iter__(self):
        return iter((self.branch, self.commit, self.dirty, self.tree_hash))


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" blocks a launch; "warning" does not
    node_index: int | None  # None: about the cluster as a whole
    label: str
    message: str

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def line(self) -> str:
        where = (
            f"node {self.node_index} ({self.label})" if self.node_index is not None else self.label
        )
        return f"{self.severity}: {where}: {self.message}"


# -- the script -----------------------------------------------------------------------------------


def probe_input(master_port: int) -> bytes:
    """The master's probe stdin: the port to check (probe_script's check_port)."""
    if not 1 <= master_port <= 65535:
        raise ValueError(f"master port {master_port} out of range")
    return f"{master_port}\n".encode()


def probe_script(
    master_host: str,
    workdir: str,
    *,
    check_port: bool,
    container: str | None,
    venv: str | None,
) -> str:
    """The sh script for one host; run it as `sh -c <script>` (the login shell may not be sh).

    check_port: read the master port from stdin (probe_input) and report whether it is free and
    who holds it (for the master only). Not in the script: an argv is readable by every user of
    the node, and the port is where our rendezvous will listen (train/rendezvous.py).
    container: ask Docker for the engine version and this container's state (None: skip Docker).
    venv: its bin/ goes first on PATH for the tool lookup when the directory exists.
    """
    lines = [
        f"M={sh_quote(master_host)}",
        f"W={sh_quote(workdir)}",
        "P=" if not check_port else "IFS= read -r P || P=",
        'case $P in *[!0-9]*) P=;; esac',
        # The report is stdout alone: the master's comes back with stderr mixed in (its port
        # arrives on stdin, run_with_input), where a stray message would land in a section.
        "exec 2>/dev/null",
        f"C={sh_quote(container or '')}",
        f"V={sh_quote(venv or '')}",
        "export LC_ALL=C",
        section_function(SECTION_MARK),
        "s hostname; uname -n",
        # Prefer a non-loopback address: Debian maps the host's own name to 127.0.1.1.
        "MIP=$(getent ahostsv4 \"$M\" 2>/dev/null | awk '$1 !~ /^127\\./ {print $1; exit}')",
        '[ -n "$MIP" ] || MIP=$(getent ahostsv4 "$M" 2>/dev/null | awk \'{print $1; exit}\')',
        's master_ip; echo "$MIP"',
        's route; [ -n "$MIP" ] && ip -o route get "$MIP" 2>&1',
        "s addrs; ip -o -4 addr show 2>&1",
        # Without iproute2 (minimal images, sandboxes) the kernel's table still names the route.
        "s proc_route; command -v ip >/dev/null 2>&1 || cat /proc/net/route 2>/dev/null",
        "s nvidia; command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>&1",
        "s rocm; command -v rocm-smi >/dev/null 2>&1 && rocm-smi --showproductname --csv 2>&1",
        # Without rocm-smi the kernel still lists AMD GPUs: topology nodes with a non-zero gpu_id.
        "s kfd; cat /sys/class/kfd/kfd/topology/nodes/*/gpu_id 2>/dev/null",
        "s user; id -u; id -un",
        # Who holds the GPUs: "pid owner MiB name" per compute process, every user's (the driver
        # lists them all). AMD: the KFD's per-process directories, memory unknown.
        "s gpu_procs",
        "if command -v nvidia-smi >/dev/null 2>&1; then",
        "  nvidia-smi --query-compute-apps=pid,used_memory,process_name --format=csv,noheader,"
        "nounits 2>/dev/null | while IFS=', ' read -r GP GM GN; do",
        '    case $GP in *[!0-9]*|"") continue;; esac',
        '    echo "$GP $(stat -c %U "/proc/$GP" 2>/dev/null || echo "?") $GM $GN"',
        "  done",
        "fi",
        "for GD in /sys/class/kfd/kfd/proc/[0-9]*; do",
        '  [ -d "$GD" ] || continue; GP=${GD##*/}',
        '  echo "$GP $(stat -c %U "/proc/$GP" 2>/dev/null || echo "?") - $(cat "/proc/$GP/comm" 2>/dev/null)"',
        "done",
        's workdir; [ -d "$W" ] && echo yes || echo no',
        "s git",
        'if [ -e "$W/.git" ]; then',
        # Git runs what a repository's config names (core.fsmonitor, filters, ...): in another
        # user's checkout that is their command, run as us. Such a checkout is reported, and git
        # is not run there (nor told to trust that checkout through git's own trust setting).
        "  O=",
        '  for F in "$W" "$W/.git" "$W/.git/config"; do',
        '    [ -z "$O" ] && { [ -e "$F" ] || [ -L "$F" ]; } && [ ! -O "$F" ] && O=$F',
        "  done",
        '  if [ -n "$O" ]; then',
        '    echo "foreign=$O"',
        '    echo "owner=$(stat -L -c %U "$O" 2>/dev/null)"',
        '    echo "owner_uid=$(stat -L -c %u "$O" 2>/dev/null)"',
        "  elif command -v git >/dev/null 2>&1; then",
        f'    G() {{ git {" ".join(GIT_SAFE_OPTIONS)} -C "$W" "$@"; }}',
        '    echo "branch=$(G rev-parse --abbrev-ref HEAD 2>&1 | head -1)"',
        '    echo "commit=$(G rev-parse HEAD 2>&1 | head -1)"',
        '    echo "dirty=$(G status --porcelain --untracked-files=no 2>/dev/null'
        ' | head -1 | wc -l)"',
        # Same commit but uncommitted changes: equal diffs mean equal tracked content.
        f'    echo "diff=$(G {" ".join(GIT_DIFF_OPTIONS)} 2>/dev/null'
        " | sha256sum | awk '{print $1}')\"",
        "  else echo 'git=missing'; fi",
        "fi",
        f's sync_record; cat "$W/{SYNC_RECORD}" 2>/dev/null',
        # Recomputed, not trusted: a file edited or removed on the node after sync shows up.
        f's sync_hash; [ -f "$W/{SYNC_FILES}" ] && (cd "$W" && xargs -0 -r sha256sum -z -- '
        f"< {SYNC_FILES} 2>/dev/null | sha256sum | awk '{{print $1}}')",
        "s shm; df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $2}'",
        '[ -n "$V" ] && [ -d "$V/bin" ] && PATH="$V/bin:$PATH"',
        "s tools; for t in "
        + " ".join(TOOLS)
        + '; do command -v "$t" >/dev/null 2>&1 && echo "$t"; done',
        "s port",
        # /proc/net rather than ss: always there. A listener in state 0A on the port = busy,
        # followed by who holds it (tasks/lib/ports.py).
        PORT_HOLDERS_SH,
        'if [ -n "$P" ]; then',
        '  PH=$(gemm_port_holders "$P")',
        '  if [ -n "$PH" ]; then echo busy; printf \'%s\\n\' "$PH"; else echo free; fi',
        "fi",
        "s docker",
        'if [ -n "$C" ]; then',
        "  if command -v docker >/dev/null 2>&1; then",
        "    echo \"engine=$(docker version --format '{{.Server.Version}}' 2>&1 | tr '\\n' ' ')\"",
        '    echo "state=$(docker inspect --format \'{{.State.Status}}\' "$C" 2>&1'
        " | tr '\\n' ' ')\"",
        # What docker-up needs beyond a preflight: the compose to drive, the container to compare.
        f'    echo "compose=$({COMPOSE_VARIANT_SH})"',
        '    echo "id=$(docker inspect --type container --format \'{{.Id}}\' "$C" 2>/dev/null)"',
        "  else echo 'docker=missing'; fi",
        "fi",
        "s end",
        "exit 0",
    ]
    return "\n".join(lines) + "\n"



# -- parsing --------------------------------------------------------------------------------------




def parse_route(text: str) -> tuple[str | None, str | None]:
    """(dev, src) of `ip -o route get` output; (None, None) when there is no route."""
    tokens = text.split()
    dev = src = None
    for key, value in zip(tokens, tokens[1:], strict=False):
        if key == "dev" and dev is None:
            dev = value
        elif key == "src" and src is None:
            src = value
    return dev, src


def route_from_proc(table: str, destination: str) -> str | None:
    """The interface of the most specific /proc/net/route entry for `destination` (IPv4).

    Fields are little-endian hex; ties go to the lowest metric, as the kernel does.
    """
    try:
        target = int(ipaddress.IPv4Address(destination))
    except ValueError:
        return None
    best: tuple[int, int, str] | None = None  # (-prefix length, metric, interface)
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            network, metric, mask = (
                int.from_bytes(bytes.fromhex(fields[1]), "little"),
                int(fields[6]),
                int.from_bytes(bytes.fromhex(fields[7]), "little"),
            )
        except ValueError:
            continue
        if target & mask == network & mask:
            candidate = (-bin(mask).count("1"), metric, fields[0])
            best = candidate if best is None or candidate < best else best
    return best[2] if best else None


def parse_addresses(text: str) -> tuple[tuple[str, str], ...]:
    """(ifname, address) pairs from `ip -o -4 addr show` ("2: eth0    inet 10.0.0.1/24 ...")."""
    pairs = []
    for line in text.splitlines():
        tokens = line.split()
        if len(tokens) >= 4 and tokens[2] == "inet":
            ifname = tokens[1].split("@", 1)[0]
            pairs.append((ifname, tokens[3].split("/", 1)[0]))
    return tuple(pairs)


def interface_holding(address: str, interfaces: Iterable[tuple[str, str]]) -> str | None:
    for ifname, held in interfaces:
        if held == address:
            return ifname
    return None


def parse_gpus(nvidia: str, rocm: str, kfd: str) -> tuple[str, int, tuple[str, ...]]:
    """(vendor, count, names) from `nvidia-smi -L`, `rocm-smi --showproductname --csv`, kfd ids."""
    names = []
    for line in nvidia.splitlines():
        match = _NVIDIA_LINE.match(line.strip())
        if match:
            names.append(match.group(2).strip())
    if names:
        return "nvidia", len(names), tuple(names)
    rocm_names = _parse_rocm_csv(rocm)
    if rocm_names:
        return "amd", len(rocm_names), tuple(rocm_names)
    kfd_gpus = [line for line in kfd.split() if line.strip() not in ("", "0")]
    if kfd_gpus:
        return "amd", len(kfd_gpus), tuple("AMD GPU" for _ in kfd_gpus)
    return "none", 0, ()


def _parse_rocm_csv(text: str) -> list[str]:
    """Rows "card0,<series>,<model>,..." under a "device,Card Series,..." header."""
    header: list[str] | None = None
    names = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.split(",")]
        if cells and cells[0].lower() == "device":
            header = [cell.lower() for cell in cells]
        elif header and cells and re.fullmatch(r"card\d+", cells[0]):
            row = dict(zip(header, cells, strict=False))
            names.append(row.get("card series") or row.get("card model") or cells[0])
    return names


def parse_key_values(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return values


def parse_sync_record(text: str) -> dict[str, object] | None:
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _parse_docker(text: str) -> tuple[str | None, str | None, str | None]:
    """(engine version, container state, docker's error) from the docker section."""
    values = parse_key_values(text)
    if not values:
        return None, None, None
    if values.get("docker") == "missing":
        return None, None, DOCKER_MISSING
    engine_text = values.get("engine", "")
    engine = engine_text if re.fullmatch(r"[0-9][0-9A-Za-z.+~-]*", engine_text) else None
    error = None if engine else (engine_text or "no answer from the Docker engine")
    state_text = values.get("state", "")
    if engine is None:
        state = None
    elif re.fullmatch(r"[a-z]+", state_text):
        state = state_text
    elif "no such" in state_text.lower():
        state = "absent"
    else:
        state = None
        error = f"docker inspect: {state_text}"
    return engine, state, error


def parse_probe_output(node_index: int, label: str, text: str) -> HostFacts:
    """HostFacts from the output of `probe_script` on one host."""
    sections = split_sections(text, SECTION_MARK)
    notes: list[str] = []
    if "end" not in sections:
        notes.append("probe output was cut short; facts may be incomplete")
    master_ip = sections.get("master_ip") or None
    interfaces = parse_addresses(sections.get("addrs", ""))
    ifname, address = parse_route(sections.get("route", ""))
    if ifname is None and master_ip and sections.get("proc_route"):
        ifname = route_from_proc(sections["proc_route"], master_ip)
    if ifname == "lo" and address is not None and not address.startswith("127."):
        # The master routes to itself through lo: report the interface that holds the address.
        ifname = interface_holding(address, interfaces) or ifname
    gpu_vendor, gpu_count, gpu_names = parse_gpus(
        sections.get("nvidia", ""), sections.get("rocm", ""), sections.get("kfd", "")
    )
    git = parse_key_values(sections.get("git", ""))
    branch = commit = None
    dirty: bool | None = None
    diff_hash: str | None = None
    has_git = False
    checkout_owner = None
    if git.get("foreign"):
        uid = git.get("owner_uid") or "?"
        name = git.get("owner", "")
        checkout_owner = name if name and name != "UNKNOWN" else f"uid {uid}"
    elif git.get("git") == "missing":
        notes.append("the workdir is a git checkout but git is not installed")
    elif git:
        commit_text = git.get("commit", "")
        if re.fullmatch(r"[0-9a-f]{40}([0-9a-f]{24})?", commit_text):
            has_git = True
            commit = commit_text
            branch = git.get("branch") or None
            dirty = git.get("dirty", "0") not in ("", "0")
            diff_hash = git.get("diff") or None
        else:
            notes.append(f"git failed in the workdir: {commit_text or git.get('branch', '')}")
    record = parse_sync_record(sections.get("sync_record", ""))
    tree_hash = sections.get("sync_hash") or None
    synced = False
    if record is not None and tree_hash is not None and record.get("tree_hash") == tree_hash:
        # The files are still exactly what sync wrote: they came from the recorded checkout.
        synced = True
        branch = _str_or_none(record.get("branch"))
        commit = _str_or_none(record.get("commit"))
        dirty = bool(record.get("dirty"))
        diff_hash = None
    docker_section = sections.get("docker", "")
    docker_engine, container_state, docker_error = _parse_docker(docker_section)
    docker_values = parse_key_values(docker_section)
    port_text, *holder_lines = sections.get("port", "").splitlines() or [""]
    shm_text = sections.get("shm", "")
    uid, user = parse_user(sections.get("user", ""))
    return HostFacts(
        node_index=node_index,
        label=label,
        hostname=sections.get("hostname", "").strip() or "?",
        address=address,
        ifname=ifname,
        gpu_vendor=gpu_vendor,
        gpu_count=gpu_count,
        gpu_names=gpu_names,
        branch=branch,
        commit=commit,
        dirty=dirty,
        tree_hash=tree_hash,
        docker_engine=docker_engine,
        container_state=container_state,
        shm_bytes=int(shm_text) * 1024 if shm_text.isdigit() else None,
        tools=frozenset(t for t in sections.get("tools", "").split() if t in TOOLS),
        port_free={"free": True, "busy": False}.get(port_text),
        port_holders=parse_port_holders(holder_lines),
        master_ip=master_ip,
        interfaces=interfaces,
        workdir_exists=sections.get("workdir", "yes") != "no",
        has_git=has_git,
        synced=synced,
        diff_hash=diff_hash,
        docker_error=docker_error,
        docker_compose=docker_values.get("compose") or None,
        container_id=docker_values.get("id") or None,
        notes=tuple(notes),
        checkout_owner=checkout_owner,
        uid=uid,
        user=user,
        gpu_processes=parse_gpu_processes(sections.get("gpu_procs", "")),
    )


def parse_user(text: str) -> tuple[int | None, str | None]:
    lines = text.split()
    uid = int(lines[0]) if lines and lines[0].isdigit() else None
    return uid, (lines[1] if len(lines) > 1 else None)


def parse_gpu_processes(text: str) -> tuple[GpuProcess, ...]:
    """The probe's `gpu_procs` lines: "pid owner MiB|- name"; malformed lines are skipped."""
    found = []
    for line in text.splitlines():
        parts = line.split(maxsplit=3)
        if len(parts) < 3 or not parts[0].isdigit():
            continue
        memory = int(parts[2]) if parts[2].isdigit() else None
        found.append(GpuProcess(pid=int(parts[0]), user=parts[1], memory_mib=memory,
                                name=parts[3].strip() if len(parts) > 3 else ""))
    return tuple(found)


def gpu_busy_message(facts: HostFacts) -> str | None:
    """One line naming who holds this host's GPUs (owner, pid, memory), or None when nobody.

    Another user's process is theirs: it is reported, never counted as one of our runs or
    touched; our own may be a run of ours or a leftover (`fab status` tells which).
    """
    if not facts.gpu_processes:
        return None
    holders = []
    for proc in facts.gpu_processes:
        whose = "yours" if facts.user is not None and proc.user == facts.user else proc.user
        memory = f", {proc.memory_mib} MiB" if proc.memory_mib is not None else ""
        holders.append(f"pid {proc.pid} ({whose}{', ' + proc.name if proc.name else ''}{memory})")
    return ("GPU(s) in use by " + "; ".join(holders)
            + ": a run here shares them (slower GEMMs, less memory)")


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def resolve_master_side(facts: Sequence[HostFacts]) -> list[HostFacts]:
    """Give the master the address the workers reach it at, and the interface holding it.

    On the master, its own name often resolves to a loopback alias (Debian's 127.0.1.1), so the
    route it sees is `lo`. The workers resolved the real address; the master's interface list
    says which interface holds it. facts[0] is the master.
    """
    if len(facts) < 2:
        return list(facts)
    master = facts[0]
    seen_by_workers = [
        f.master_ip for f in facts[1:] if f.master_ip and not _is_loopback(f.master_ip)
    ]
    if not seen_by_workers or (
        master.address and not _is_loopback(master.address) and master.ifname not in (None, "lo")
    ):
        return list(facts)
    address = seen_by_workers[0]
    ifname = interface_holding(address, master.interfaces)
    if ifname is None:
        return list(facts)
    return [replace(master, address=address, ifname=ifname), *facts[1:]]


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


# -- judgement ------------------------------------------------------------------------------------


def is_detached(branch: str | None) -> bool:
    return branch in (None, "HEAD")


def checkout_mismatch(facts: HostFacts, local: CheckoutState) -> str | None:
    """Why this host's workdir differs from the controller's checkout; None when it matches.

    Same content (the hash sync recorded, recomputed on the host) is a match whatever git says;
    otherwise branch and commit must be equal (branch ignored when either side is detached).
    """
    if facts.checkout_owner is not None:
        return (f"checkout owned by {facts.checkout_owner}: git is not run in another user's "
                "checkout (its config could run their commands as you)")
    if local.tree_hash is not None and facts.tree_hash == local.tree_hash:
        return None
    if facts.commit is None:
        if facts.tree_hash is not None:
            return "its synced files differ from this checkout (changed since the last sync)"
        return "it has neither a git checkout nor a `fab sync` record in the workdir"
    if local.commit is None:
        return None  # the controller is no git checkout: there is nothing to compare commits with
    parts = []
    if facts.commit != local.commit:
        parts.append(f"commit {facts.commit[:12]} != {local.commit[:12]}")
    if (
        not is_detached(facts.branch)
        and not is_detached(local.branch)
        and facts.branch != local.branch
    ):
        parts.append(f"branch {facts.branch} != {local.branch}")
    return ", ".join(parts) or None


def uncommitted_differ(facts: HostFacts, local: CheckoutState) -> bool:
    """Same commit, but the uncommitted changes of the two checkouts are not the same."""
    if facts.synced or not facts.has_git or facts.commit != local.commit:
        return False
    if local.tree_hash is not None and facts.tree_hash == local.tree_hash:
        return False
    if not facts.dirty and not local.dirty:
        return False
    return facts.diff_hash is None or facts.diff_hash != local.diff_hash


def mismatch_hint(facts: HostFacts, local: CheckoutState, workdir: str) -> str:
    if facts.checkout_owner is not None:
        return ("use a workdir of your own (set cluster.workdir, then `fab sync`), or have "
                f"{sh_quote(workdir)} chown-ed to the user fab connects as")
    if facts.has_git and not facts.synced:
        git = f"git -C {sh_quote(workdir)}"
        if is_detached(local.branch):
            # A commit checks out detached: there is no branch for `git pull` to update.
            steps = [f"{git} fetch", f"{git} checkout {sh_quote(local.commit or '')}"]
        else:
            steps = [f"{git} fetch", f"{git} checkout {sh_quote(local.branch)}", f"{git} pull"]
        return "run `fab sync`, or on that host: " + " && ".join(steps)
    return "run `fab sync`"


def judge_host(
    facts: HostFacts,
    *,
    local: CheckoutState,
    workdir: str,
    nproc: int | str,
    docker_enabled: bool,
    socket_ifname: str | None = None,
    compare_checkout: bool = True,
) -> list[Finding]:
    """Errors and warnings about one host on its own.

    compare_checkout: False where the host's workdir is the controller's own checkout (this
    machine alone), or where the caller compared it already: there is nothing to compare, so a
    checkout that is no git repository (an unpacked release, a user's own directory) is fine.
    """
    found: list[Finding] = []

    def error(message: str) -> None:
        found.append(Finding("error", facts.node_index, facts.label, message))

    def warning(message: str) -> None:
        found.append(Finding("warning", facts.node_index, facts.label, message))

    for note in facts.notes:
        warning(note)
    if not facts.workdir_exists:
        error(f"workdir {workdir} does not exist: run `fab sync` or set cluster.workdir")
    elif facts.checkout_owner is not None:
        error(f"{checkout_mismatch(facts, local)}; {mismatch_hint(facts, local, workdir)}")
    elif compare_checkout:
        why = checkout_mismatch(facts, local)
        if why:
            error(f"checkout differs from this one ({why}): {mismatch_hint(facts, local, workdir)}")
        elif uncommitted_differ(facts, local):
            warning(
                "uncommitted changes differ between this checkout and this host's: "
                "commit and pull, or run `fab sync`"
            )
    if socket_ifname:
        if facts.interfaces and socket_ifname not in {name for name, _ in facts.interfaces}:
            error(
                f"cluster.socket_ifname {socket_ifname!r} has no IPv4 address on this host "
                f"(has: {', '.join(sorted({n for n, _ in facts.interfaces}))})"
            )
    elif facts.ifname is None:
        error(
            "no route to the master: its name does not resolve here or `ip` is missing; "
            "fix /etc/hosts or DNS on that host, or set cluster.socket_ifname"
        )
    if isinstance(nproc, int) and 0 < facts.gpu_count < nproc:
        # nproc may come from launch.nproc, --nproc or $NPROC_PER_NODE: name none of them.
        error(f"{facts.gpu_count} GPU(s), fewer than the launch's nproc ({nproc}): "
              "lower --nproc or use 'auto'")
    if docker_enabled:
        if facts.docker_engine is None:
            error(
                f"Docker engine not usable: {facts.docker_error or 'no answer'} "
                "(or set docker.enabled: false for bare runs)"
            )
        elif facts.container_state != "running":
            warning(f"container is {facts.container_state or 'unknown'}: run `fab docker-up`")
    busy = gpu_busy_message(facts)
    if busy:
        warning(busy)
    if facts.port_free is False:
        error(f"the master port is in use{held_by(facts.port_holders)}: pick another "
              "with --master-port (launch.master_port)")
    if facts.shm_bytes is not None and facts.shm_bytes < MIN_SHM_BYTES and not docker_enabled:
        warning(
            f"/dev/shm is only {format_bytes(facts.shm_bytes)}: NCCL's shared-memory "
            "transport may fail; remount it larger"
        )
    return found


def judge_cluster(facts: Sequence[HostFacts]) -> list[Finding]:
    """Problems that involve several hosts."""
    found: list[Finding] = []
    with_gpus = [f for f in facts if f.gpu_count]
    without = [f for f in facts if not f.gpu_count]
    if with_gpus and without:
        found.append(
            Finding(
                "error",
                None,
                "cluster",
                f"nodes {', '.join(str(f.node_index) for f in without)} have no GPU while nodes "
                f"{', '.join(str(f.node_index) for f in with_gpus)} do: ranks would pick different "
                "backends (nccl vs gloo)",
            )
        )
    vendors = {f.gpu_vendor for f in with_gpus}
    if len(vendors) > 1:
        found.append(
            Finding(
                "error",
                None,
                "cluster",
                f"mixed GPU vendors ({', '.join(sorted(vendors))}): one collective "
                "library cannot span them",
            )
        )
    hostnames: dict[str, int] = {}
    for f in facts:
        if f.hostname in hostnames and f.hostname != "?":
            found.append(
                Finding(
                    "warning",
                    f.node_index,
                    f.label,
                    f"same hostname {f.hostname!r} as node {hostnames[f.hostname]}: "
                    "is the same machine listed twice?",
                )
            )
        hostnames.setdefault(f.hostname, f.node_index)
    return found


def format_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


__all__ = [
    "HostFacts",
    "GpuProcess",
    "gpu_busy_message",
    "parse_gpu_processes",
    "CheckoutState",
    "Finding",
    "probe_script",
    "probe_input",
    "sh_command",
    "parse_probe_output",
    "resolve_master_side",
    "checkout_mismatch",
    "judge_host",
    "judge_cluster",
    "format_bytes",
    "SYNC_RECORD",
    "SYNC_FILES",
    "TOOLS",
    "GIT_SAFE_OPTIONS",
    "GIT_DIFF_OPTIONS",
]
