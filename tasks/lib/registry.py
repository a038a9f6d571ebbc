"""The run registry on every node, and the shell commands that read and act on it.

The registry is node-local (cluster.registry_dir, default /tmp/gemm-runs-<uid>: each user's own,
mode 0700, checked before every use -- tasks/lib/nodefs.py) and is the truth about runs: status
and stop work from any controller because they read it, not the controller's memory.
One entry per node of a run, one value per file so plain shell reads it without a JSON parser:

    <registry_dir>/<run_id>/node_<rank>/
        meta.json          run_id, node_rank, host, user, controller, run_dir, output_dir,
                           output_log, container (or null), started_at, launcher_pid, command
        launcher.pid       "pid start-time" of the node launcher: session and group leader
        child.pid          "pid start-time" of torchrun (bare) or the `docker exec` client
        container.pid      "pid start-time" of torchrun (= its process group) in the container
        state              starting | running | exited | stopped | killed
        exit_code, started_at, ended_at, stop_requested (stop | kill)
        run_id, node_rank, host, user, container, output_dir, output_log, run_dir  (same as meta)
        launcher.log       the launcher's own output before it switches to output_log

Which processes belong to a run: every process of ours (its owner's uid; another user can copy
our markers, not our uid) whose initial environment (/proc/PID/environ) carries
GEMM_RUN_ID=<run id> and GEMM_NODE_RANK=<rank>. The launcher exports both, so every
descendant carries them -- torchrun's workers, which torch starts in sessions of their own, and the
processes `docker exec` starts inside the container (passed with -e). Nothing is ever matched by
its name or command line, so someone else's `python train.py` is never touched.

Everything that runs on a node is bash + coreutils + grep + procps (awk for the status scan): the
node needs neither this package nor Python. The commands here are pure strings; tasks/runs.py
sends them.
"""
from __future__ import annotations

import json
import math
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass

from tasks.lib.nodefs import SAFE_FS_SH
from tasks.lib.ports import PORT_HOLDERS_SH
from tasks.lib.quoting import sh_join, sh_quote
from tasks.lib.templating import render_template

LAUNCHER_TEMPLATE = "node_launcher.sh.j2"
ACTIVE_STATES = ("starting", "running")
FINAL_STATES = ("exited", "stopped", "killed")
# How often the stop command looks whether the run's processes are gone.
STOP_POLL_SECONDS = 0.2
# After SIGKILL, how long to keep checking (and re-killing) before reporting survivors.
KILL_CONFIRM_POLLS = 25
# How long a graceful stop gives a live launcher, after its torchrun was killed, to record the end.
LAUNCHER_RECORD_POLLS = 15
START_WAIT_POLLS = 100  # x 0.05 s: the launcher writes its pid first thing
EXIT_NO_SUCH_RUN = 3    # logs command: the run has no entry on this host

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
CONTAINER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,253}")


class RegistryError(ValueError):
    """A value that cannot go into the registry or a node command; the message says which."""


def validate_run_id(run_id: str) -> str:
    # Run ids name directories and are globbed by the node commands: no '/', no glob characters.
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise RegistryError(f"run id {run_id!r} must be 1-200 letters, digits, '.', '_' or '-' "
                            "(not starting with a symbol)")
    return run_id


def validate_node_path(path: str, what: str) -> str:
    """Node paths are used verbatim on every node: absolute, no '~' (it would not expand quoted)."""
    if not isinstance(path, str) or not posixpath.isabs(path) or "\n" in path or "\0" in path:
        raise RegistryError(f"{what} {path!r} must be an absolute path on the nodes "
                            "(no '~', no newline)")
    return path


def entry_dir(registry_dir: str, run_id: str, node_rank: int) -> str:
    return posixpath.join(registry_dir, validate_run_id(run_id), f"node_{int(node_rank)}")


# -- shell text run on the nodes ------------------------------------------------------------------

# POSIX sh (it also runs inside the container, through `docker exec C sh -c`): send signal $1 to
# every process of this pid namespace whose environment carries run $2 and node rank $3; prints
# how many it signalled. grep's exit status is ignored on purpose: it is 2 as soon as one
# environ is unreadable (another user's process), even when it found ours.
SCAN_KILL_SH = r"""sig=$1 run=$2 rank=$3 n=0
f=$(grep -lzxsF -e "GEMM_RUN_ID=$run" /proc/[0-9]*/environ 2>/dev/null)
[ -n "$f" ] && f=$(grep -lzxsF -e "GEMM_NODE_RANK=$rank" $f 2>/dev/null)
for p in $f; do p=${p#/proc/}; p=${p%/environ}
  [ "$p" = "$$" ] && continue
  kill -s "$sig" "$p" 2>/dev/null && n=$((n+1))
done
echo "$n"
"""

# bash functions shared by the node launcher and the one-shot commands below.
SHELL_LIB = SAFE_FS_SH + r"""# --- run-registry helpers (tasks/lib/registry.py) ---
GEMM_SCAN_KILL='""" + SCAN_KILL_SH.replace("'", "'\\''") + r"""'
gemm_now() { date -u +%Y-%m-%dT%H:%M:%S.%3NZ; }
# Atomic write: readers never see a half-written value (mktemp: a fresh name nobody chose).
gemm_put() { local t; t=$(mktemp -- "$1.XXXXXX") && printf '%s\n' "$2" >"$t" && mv -f -- "$t" "$1"; }
gemm_get() { local v=; [ -r "$1" ] && IFS= read -r v <"$1"; printf '%s' "$v"; }
# gemm_read VAR FILE: gemm_get into VAR without the fork of $(...): a loop over every entry of
# a registry that has seen months of runs must not fork per value.
gemm_read() { local -n gemm_into=$1; gemm_into=; [ -r "$2" ] && IFS= read -r gemm_into <"$2"; return 0; }
# gemm_get for another user's registry (root's --all-users stop): a regular file only, opened by
# a child that gives up after 2 s (a FIFO swapped in after the test would block an open of ours
# for ever), its first line of at most 4 KiB.
gemm_get_theirs() {
  local v=; [ -f "$1" ] && [ ! -L "$1" ] || return 0
  IFS= read -r v < <(timeout 2 head -c 4096 -- "$1" 2>/dev/null); printf '%s' "$v"
}
gemm_json() {
  local s=$1; s=${s//\\/\\\\}; s=${s//\"/\\\"}; s=${s//$'\n'/\\n}; s=${s//$'\r'/\\r}
  s=${s//$'\t'/\\t}; printf '"%s"' "$s"
}
# The registry is this user's alone (mode 0700, see tasks/lib/nodefs.py): nobody else can plant
# entries, symlinks or a fake "running" run in it.
gemm_make_registry() {
  local why owner
  why=$(gemm_safe_dir "$1" "the run registry (cluster.registry_dir)" private 2>&1) && return 0
  owner=$(stat -c %u -- "$1" 2>/dev/null)
  if [ "$1" = "/tmp/gemm-runs-$GEMM_UID" ] && [ -n "$owner" ] && [ "$owner" != "$GEMM_UID" ]; then
    # Someone else made our default first (/tmp is everyone's): only they or root can remove
    # it. Name them, and a path of ours nobody can guess to use until then. One line: the
    # controller shows a node's last line.
    why="$why. $1 is squatted by $(gemm_user_of "$owner"): ask them or root to remove it; until then set cluster.registry_dir to a directory of yours, e.g. /tmp/gemm-runs-$GEMM_UID-$(od -An -N4 -tx4 /dev/urandom | tr -d ' '), in fabric.yaml or your fab -f file (every fab command then uses it)"
  fi
  printf '%s\n' "$why" >&2
  return 1
}
# For readers: a registry that does not exist yet holds no runs; one we cannot trust is refused.
gemm_open_registry() { [ -e "$1" ] || [ -L "$1" ] || return 0; gemm_make_registry "$1"; }
# A process's start time (clock ticks since boot, /proc/PID/stat field 22): with the pid it names
# one process for good, so a pid the kernel reused for something else is never signalled.
gemm_start_time() {
  local s; { IFS= read -r s <"/proc/$1/stat"; } 2>/dev/null || return 1
  s=${s##*) }; set -- $s; printf '%s' "${20}"
}
# "pid uid start run_id node_rank" for every process of this pid namespace carrying both markers.
gemm_scan() {
  local pid run rank pids=() rows=() i=0 uid st name
  local -A uid_of=()
  while read -r pid run rank; do pids+=("$pid"); rows+=("$run $rank"); done < <(
    grep -zsH -e '^GEMM_RUN_ID=' -e '^GEMM_NODE_RANK=' /proc/[0-9]*/environ 2>/dev/null \
      | tr '\0' '\n' | awk -v self="$$" '
        { i = index($0, ":"); split(substr($0, 1, i - 1), parts, "/"); pid = parts[3]
          kv = substr($0, i + 1)
          if (kv ~ /^GEMM_RUN_ID=/) run[pid] = substr(kv, 13); else rank[pid] = substr(kv, 16) }
        END { for (p in run) if ((p in rank) && p != self) print p, run[p], rank[p] }')
  [ "${#pids[@]}" -gt 0 ] || return 0
  # Whose process it is: another user can put our markers in their environment, not our uid.
  while read -r name uid; do uid_of[${name#/proc/}]=$uid; done < <(
    stat -c '%n %u' -- "${pids[@]/#//proc/}" 2>/dev/null)
  for pid in "${pids[@]}"; do
    uid=${uid_of[$pid]-}; st=$(gemm_start_time "$pid")
    [ -n "$uid" ] && [ -n "$st" ] && printf '%s %s %s %s\n' "$pid" "$uid" "$st" "${rows[$i]}"
    i=$((i+1))
  done
}
# "pid start" of one entry's processes owned by uid $4 (default: ours), from a scan ($1: scan
# text, $2: run, $3: rank). gemm_pids_of: the pids alone.
gemm_procs_of() {
  printf '%s\n' "$1" | awk -v r="$2" -v k="$3" -v u="${4:-$GEMM_UID}" \
    '$2 == u && $4 == r && $5 == k { print $1, $3 }'
}
gemm_pids_of() { gemm_procs_of "$@" | cut -d' ' -f1; }
# Signal $2 with $1 only while it is still the process that started at $3.
gemm_kill() { [ "$(gemm_start_time "$2")" = "$3" ] && kill -s "$1" "$2" 2>/dev/null; }
# Entries of this host (a registry on a filesystem shared by several nodes holds theirs too).
# $3: the reader of the entries' values (gemm_get; gemm_get_theirs for another user's).
gemm_entries() {
  local reg=$1 run=${2:-} get=${3:-gemm_get} host e h
  host=$(uname -n)
  for e in "$reg"/${run:-*}/node_*; do
    [ -d "$e" ] && [ ! -L "$e" ] && [ -f "$e/run_id" ] || continue
    if [ "$get" = gemm_get ]; then gemm_read h "$e/host"; else h=$($get "$e/host"); fi
    [ -z "$h" ] || [ "$h" = "$host" ] || continue
    printf '%s\n' "$e"
  done
}
# A pid file's content ($1: "pid start", or a bare pid from an older launcher) as "pid start"
# when that process is alive and one of the entry's ($2: scan, $3 run, $4 rank, $5 uid); else
# nothing. gemm_recorded_proc: the same, $1 the pid file.
gemm_recorded_proc() { gemm_live_proc "$(gemm_get "$1")" "${@:2}"; }
gemm_live_proc() {
  local pid start line
  read -r pid start <<<"$1"; [ -n "$pid" ] || return 1
  line=$(gemm_procs_of "$2" "$3" "$4" "${5-}" | awk -v p="$pid" '$1 == p' | head -n 1)
  [ -n "$line" ] || return 1
  [ -z "$start" ] || [ "${line#* }" = "$start" ] || return 1
  printf '%s\n' "$line"
}
# Is the entry's launcher alive? $2: scan text, $3: the entry's owner (default: us).
gemm_launcher_alive() {
  gemm_recorded_proc "$1/launcher.pid" "$2" "$(gemm_get "$1/run_id")" "$(gemm_get "$1/node_rank")" "${3-}" >/dev/null
}
gemm_is_final() { case $(gemm_get "$1/state") in exited|stopped|killed) return 0;; esac; return 1; }
# Record the end for a launcher that cannot any more (killed, or vanished): $1 entry, $2 state, $3 code.
gemm_finalize() {
  gemm_is_final "$1" && return 0
  [ -s "$1/exit_code" ] || gemm_put "$1/exit_code" "$3"
  gemm_put "$1/ended_at" "$(gemm_now)"
  gemm_put "$1/state" "$2"
}
# Steps done: the largest "step" of the last line of the node's rank_XX_metrics.jsonl files.
gemm_steps() {
  local f s best=
  for f in "$1"/rank_*_metrics.jsonl; do
    [ -f "$f" ] || continue
    s=$(tail -n 1 "$f" | sed -n 's/.*"step": *\([0-9][0-9]*\).*/\1/p')
    [ -n "$s" ] && { [ -z "$best" ] || [ "$s" -gt "$best" ]; } && best=$s
  done
  printf '%s' "$best"
}
# --- end of run-registry helpers ---
"""

_START_SH = r"""reg=$(gemm_registry "$1") run=$2 rank=$3 launcher=$4 polls=$5 workdir=$6 mode=${7-detach}
if [ "$mode" = step ]; then
  # One task of the run's srun step: the node rank is this node's place in the run's node list
  # ($8), found by the name Slurm gave this node.
  rank= i=0
  for n in $8; do [ "$n" = "${SLURMD_NODENAME-}" ] && rank=$i; i=$((i+1)); done
  [ -n "$rank" ] || { echo "node ${SLURMD_NODENAME-?} is not one of the run's nodes ($8)" >&2; exit 2; }
fi
gemm_make_registry "$reg" || exit 1
e=$reg/$run/node_$rank
# Right before anything runs: the run dir, the launcher in it and the checkout the ranks import
# from must be beyond other users' reach.
gemm_safe_dir "$(dirname -- "$launcher")" "the run directory" private || exit 1
gemm_safe_file "$launcher" "the node launcher" || exit 1
gemm_safe_dir "$workdir" "the workdir (cluster.workdir)" || exit 1
{ [ -d "$reg/$run" ] && [ ! -L "$reg/$run" ]; } || mkdir -m 700 -- "$reg/$run" 2>/dev/null \
  || [ -d "$reg/$run" ] || { echo "cannot create the registry entry $reg/$run" >&2; exit 1; }
if ! mkdir -m 700 -- "$e" 2>/dev/null; then
  if gemm_launcher_alive "$e" "$(gemm_scan)"; then
    echo "run $run already has a live launcher for node $rank (pid $(gemm_get "$e/launcher.pid" | cut -d' ' -f1))" >&2
  else
    echo "run $run already has a registry entry for node $rank ($e); run ids are never reused: start a new run" >&2
  fi
  exit 1
fi
# Own session (setsid), stdin/stdout/stderr off the SSH channel: sshd does not wait for the
# launcher, and the launcher neither gets SIGHUP nor dies of a broken pipe when the channel goes.
( export GEMM_RUN_ID=$run GEMM_NODE_RANK=$rank
  exec setsid bash "$launcher" "$rank" </dev/null >>"$e/launcher.log" 2>&1 ) &
child=$!
i=0
while [ "$i" -lt "$polls" ]; do
  if [ -s "$e/launcher.pid" ]; then
    pid=$(gemm_get "$e/launcher.pid" | cut -d' ' -f1)
    [ "$mode" = step ] || { echo "$pid"; exit 0; }
    # In a step this shell is the task Slurm watches: it stays until the launcher ends and exits
    # with its status (--kill-on-bad-exit then ends the other nodes' tasks). A signal of the step
    # reaches the launcher itself (Slurm signals every process of the step): keep waiting.
    echo "gemm-started node=$rank pid=$pid"
    trap 'signalled=1' TERM INT HUP
    code=127
    while :; do
      signalled=0; wait "$child"; rc=$?
      [ "$rc" = 127 ] && break   # reaped in the previous round: code holds its status
      code=$rc
      [ "$signalled" = 1 ] || break
    done
    exit "$code"
  fi
  sleep 0.05; i=$((i+1))
done
echo "node launcher did not start: $(tail -n 3 "$e/launcher.log" 2>/dev/null | tr '\n' ' ')" >&2
exit 1
"""

_STATUS_SH = r"""reg=$(gemm_registry "$1") run=$2 recent=$3
gemm_open_registry "$reg" || exit 1
scan=$(gemm_scan)
# The runs and node ranks that have a process of ours on this host (scan rows: pid uid start
# run rank). A finished entry is active while its launcher or any process of its run is left,
# and every such process is in the scan: the look-up needs no fork per entry (a registry keeps
# every run this user made on the host).
declare -A scanned=()
while read -r _ uid _ run_of rank_of; do
  [ "$uid" = "$GEMM_UID" ] && scanned["$run_of $rank_of"]=1
done <<<"$scan"
rows=
while IFS= read -r e; do
  [ -n "$e" ] || continue
  gemm_read run_id "$e/run_id"; gemm_read rank "$e/node_rank"; gemm_read state "$e/state"
  gemm_read started "$e/started_at"
  active=1
  case $state in exited|stopped|killed) [ -n "${scanned["$run_id $rank"]-}" ] || active=0;; esac
  rows+="$active ${started:--} $e"$'\n'
done < <(gemm_entries "$reg" "$run")
printf '@@ host %s\n' "$(uname -n)"
n=0
while read -r active started e; do
  [ -n "$e" ] || continue
  if [ "$active" = 0 ]; then
    [ "$n" -lt "$recent" ] || continue
    n=$((n+1))
  fi
  run_id=$(gemm_get "$e/run_id"); rank=$(gemm_get "$e/node_rank")
  pids=$(gemm_pids_of "$scan" "$run_id" "$rank")
  alive=0; gemm_launcher_alive "$e" "$scan" && alive=1
  printf '@@ entry\n'
  for key in run_id node_rank state exit_code started_at ended_at host user container output_dir \
             output_log run_dir; do
    printf '%s=%s\n' "$key" "$(gemm_get "$e/$key")"
  done
  printf 'launcher.pid=%s\n' "$(gemm_get "$e/launcher.pid" | cut -d' ' -f1)"
  printf 'entry=%s\npid_alive=%s\nprocs=%s\nsteps_done=%s\n' "$e" "$alive" \
    "$(printf '%s' "$pids" | grep -c .)" "$(gemm_steps "$(gemm_get "$e/output_dir")")"
done < <(printf '%s' "$rows" | sort -k1,1r -k2,2r)
"""

_STOP_SH = r"""reg=$(gemm_registry "$1") run=$2 mode=$3 grace_polls=$4 scope=$5
scan=$(gemm_scan)
targets=()
# Per target entry, read once: its owner's uid, run id, node rank, pid files, container, user.
# theirs: an entry of another user's registry (root with --all-users). It is read with bounded
# reads and never written: its owner can swap any file or directory there for a symlink (or a
# FIFO) between our look and our use, and a write of root's through it would replace a file
# anywhere. Their launcher records how its run ended; a SIGKILLed one leaves its entry "lost".
declare -A vanished=() owner_of=() theirs=() run_of=() rank_of=() launcher_of=() child_of=() \
  container_of=() user_of=() final_of=()
registries=("$reg")
if [ "$scope" = all ]; then
  if [ "$GEMM_UID" != 0 ]; then
    echo "--all-users needs root on $(uname -n) (you are $(gemm_user_of "$GEMM_UID")): only root may stop other users' runs" >&2
    exit 2
  fi
  # Every user's registry in its default place (and the configured one); each entry's processes
  # are matched with the uid of the registry's owner, so a registry planted by one user cannot
  # name another user's processes.
  for r in /tmp/gemm-runs-[0-9]*; do [ "$r" = "$reg" ] || registries+=("$r"); done
else
  gemm_open_registry "$reg" || exit 1
fi
for r in "${registries[@]}"; do
  [ -d "$r" ] && [ ! -L "$r" ] || continue
  owner=$(stat -c %u -- "$r") || continue
  get=gemm_get_theirs
  # Ours to write only when it is a registry we could have made: ours, 0700, safe path.
  [ "$owner" = "$GEMM_UID" ] && gemm_open_registry "$r" 2>/dev/null && get=gemm_get
  while IFS= read -r e; do
    [ -n "$e" ] || continue
    k=$($get "$e/node_rank"); rr=$($get "$e/run_id")
    # What no launcher writes is no run's: skipped (and never printed as one).
    [[ $rr =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$ && $k =~ ^[0-9]{1,9}$ ]] || continue
    final=0; case $($get "$e/state") in exited|stopped|killed) final=1;; esac
    pids=$(gemm_pids_of "$scan" "$rr" "$k" "$owner")
    if [ -n "$run" ] || [ "$final" = 0 ] || [ -n "$pids" ]; then
      targets+=("$e"); owner_of[$e]=$owner; run_of[$e]=$rr; rank_of[$e]=$k; final_of[$e]=$final
      launcher_of[$e]=$($get "$e/launcher.pid"); child_of[$e]=$($get "$e/child.pid")
      c=$($get "$e/container"); [[ $c =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || c=
      container_of[$e]=$c
      if [ "$get" = gemm_get ]; then user_of[$e]=$(gemm_get "$e/user")
      else theirs[$e]=1; user_of[$e]=$(gemm_user_of "$owner")
      fi
      # Nothing of it left (its launcher died unrecorded): record it killed, exit code unknown.
      [ -n "$pids" ] || vanished[$e]=1
    fi
  done < <(gemm_entries "$r" "$run" "$get")
done
if [ "${#targets[@]}" = 0 ]; then
  echo "nothing to stop on $(uname -n)${run:+ for run $run}"; exit 0
fi
# Writes into an entry of ours only.
put() { [ -n "${theirs[$1]-}" ] || gemm_put "$1/$2" "$3"; }
# Are any of the targets' processes (launchers included) still there? Refreshes $scan.
any_alive() {
  local e
  scan=$(gemm_scan)
  for e in "${targets[@]}"; do
    [ -n "$(gemm_pids_of "$scan" "${run_of[$e]}" "${rank_of[$e]}" "${owner_of[$e]}")" ] && return 0
  done
  return 1
}
# Signal one entry's processes: host pids from the scan (container processes included when this
# user may see them) and, for a dockerized run, the same scan inside the container, because a
# killed `docker exec` client leaves its process running there. $3: a pid to spare (the launcher).
signal_entry() {
  local e=$1 sig=$2 spare=${3:-} p st
  while read -r p st; do
    [ -n "$p" ] && [ "$p" != "$spare" ] && gemm_kill "$sig" "$p" "$st"
  done < <(gemm_procs_of "$scan" "${run_of[$e]}" "${rank_of[$e]}" "${owner_of[$e]}")
  if [ -n "${container_of[$e]}" ]; then
    docker exec "${container_of[$e]}" sh -c "$GEMM_SCAN_KILL" gemm-kill "$sig" "${run_of[$e]}" \
      "${rank_of[$e]}" >/dev/null 2>&1 &
  fi
}
kill_all() {  # $1: also the launchers (1) or spare them so they record the end (0)
  local e spare
  for e in "${targets[@]}"; do
    spare=; [ "$1" = 1 ] || spare=${launcher_of[$e]%% *}
    signal_entry "$e" KILL "$spare"
  done
  wait
}
escalated=0
if [ "$mode" = kill ]; then
  for e in "${targets[@]}"; do put "$e" stop_requested kill; done
  kill_all 1; escalated=1
else
  for e in "${targets[@]}"; do
    [ "${final_of[$e]}" = 1 ] || put "$e" stop_requested stop
    r=${run_of[$e]} k=${rank_of[$e]} o=${owner_of[$e]}
    if proc=$(gemm_live_proc "${launcher_of[$e]}" "$scan" "$r" "$k" "$o"); then
      # The launcher forwards SIGTERM to torchrun's process group (in the container too) and
      # records how it ended; torchrun passes it to its workers once.
      gemm_kill TERM $proc
    elif proc=$(gemm_live_proc "${child_of[$e]}" "$scan" "$r" "$k" "$o"); then
      # No launcher to forward it: torchrun's group, while its leader is still the one recorded.
      [ "$(gemm_start_time "${proc% *}")" = "${proc#* }" ] && kill -s TERM -- "-${proc% *}" 2>/dev/null
    else
      signal_entry "$e" TERM ""
    fi
  done
  wait
  i=0
  while [ "$i" -lt "$grace_polls" ] && any_alive; do sleep 0.2; i=$((i+1)); done
  if any_alive; then
    escalated=1
    for e in "${targets[@]}"; do
      [ -n "${theirs[$e]-}" ] || gemm_is_final "$e" || gemm_put "$e/stop_requested" kill
    done
    kill_all 0
    i=0
    while [ "$i" -lt LAUNCHER_RECORD_POLLS ] && any_alive; do sleep 0.2; i=$((i+1)); done
    any_alive && kill_all 1
  fi
fi
i=0
while [ "$i" -lt KILL_CONFIRM_POLLS ] && any_alive; do kill_all 1; sleep 0.2; i=$((i+1)); done
status=0
for e in "${targets[@]}"; do
  r=${run_of[$e]} k=${rank_of[$e]}
  if [ -n "${vanished[$e]-}" ]; then state=killed code=
  elif [ "$escalated" = 1 ]; then state=killed code=137
  else state=stopped code=143
  fi
  if [ -n "${theirs[$e]-}" ]; then
    recorded=no
  else
    recorded=yes
    gemm_finalize "$e" "$state" "$code"
    state=$(gemm_get "$e/state") code=$(gemm_get "$e/exit_code")
  fi
  left=$(gemm_pids_of "$scan" "$r" "$k" "${owner_of[$e]}" | tr '\n' ',' | sed 's/,$//')
  if [ -n "$left" ]; then
    status=1
    echo "run $r node $k: pid(s) $left survived SIGKILL (uninterruptible sleep? see ps -o stat)" >&2
  fi
  printf 'stopped run=%s node=%s state=%s exit_code=%s survivors=%s recorded=%s user=%s\n' "$r" \
    "$k" "$state" "$code" "${left:--}" "$recorded" "${user_of[$e]//[[:space:]]/_}"
done
exit "$status"
"""

_LOGS_SH = r"""reg=$(gemm_registry "$1") run=$2 follow=$3 lines=$4
gemm_open_registry "$reg" || exit 1
e=$(gemm_entries "$reg" "$run" | head -n 1)
if [ -z "$e" ]; then
  echo "run $run has no entry in $reg on $(uname -n)" >&2; exit EXIT_NO_SUCH_RUN
fi
log=$(gemm_get "$e/output_log")
printf '@@ node_rank %s\n' "$(gemm_get "$e/node_rank")"
if [ "$lines" = all ]; then start=+1; else start=$lines; fi
if [ "$follow" = 1 ] && gemm_launcher_alive "$e" "$(gemm_scan)"; then
  # Ends by itself once the launcher has exited (and the last lines are out).
  exec tail -n "$start" -s 0.5 -F --pid="$(gemm_get "$e/launcher.pid" | cut -d' ' -f1)" -- "$log" 2>/dev/null
fi
[ -f "$log" ] || { echo "run $run: no output log at $log yet" >&2; exit 0; }
exec tail -n "$start" -- "$log"
"""


def _one_shot(script: str, name: str, args: Sequence[object]) -> str:
    """`bash -c SCRIPT NAME ARGS...`: the user's login shell may be anything; our text is bash."""
    body = SHELL_LIB + script
    return f"bash -c {sh_quote(body)} {sh_quote(name)} {sh_join(args)}"


def _registry_arg(registry_dir: str | None) -> str:
    """The configured registry, or "" for the per-user default the node resolves itself."""
    if registry_dir is None:
        return ""
    return validate_node_path(registry_dir, "registry_dir")


def launcher_start_command(launcher_path: str, node_rank: int, registry_dir: str | None,
                           run_id: str, workdir: str | None = None) -> str:
    """Start the node launcher detached and print its pid; exits 1 (stderr says why) otherwise.

    Right before the start, the run directory, the launcher and the workdir (default: the
    launcher's directory) are checked beyond other users' reach (tasks/lib/nodefs.py). Returns
    as soon as the launcher has registered itself (its pid file), not when torchrun ends.
    """
    validate_node_path(launcher_path, "launcher path")
    registry = _registry_arg(registry_dir)
    workdir = validate_node_path(workdir or posixpath.dirname(launcher_path), "workdir")
    validate_run_id(run_id)
    if isinstance(node_rank, bool) or not isinstance(node_rank, int) or node_rank < 0:
        raise RegistryError(f"node rank {node_rank!r} must be a non-negative integer")
    return _one_shot(_START_SH, "gemm-start",
                     [registry, run_id, node_rank, launcher_path, START_WAIT_POLLS, workdir])


def launcher_step_command(launcher_path: str, node_names: Sequence[str], registry_dir: str | None,
                          run_id: str, workdir: str | None = None) -> list[str]:
    """argv of every task of a run's srun step: the same checks and registry entry as
    launcher_start_command, then the launcher in the foreground of the task (Slurm tracks, signals
    and ends it with the step). Prints `gemm-started node=N pid=P` once registered; exits with
    the launcher's status. The node rank is this node's position in `node_names` (Slurm's names).
    """
    validate_node_path(launcher_path, "launcher path")
    registry = _registry_arg(registry_dir)
    workdir = validate_node_path(workdir or posixpath.dirname(launcher_path), "workdir")
    validate_run_id(run_id)
    for name in node_names:
        if not _NODE_NAME.fullmatch(name):
            raise RegistryError(f"{name!r} is not a node name")
    return ["bash", "-c", SHELL_LIB + _START_SH, "gemm-start", registry, run_id, "", launcher_path,
            str(START_WAIT_POLLS), workdir, "step", " ".join(node_names)]


_STARTED_LINE = re.compile(r"^gemm-started node=(\d+) pid=(\d+)\s*$")


def parse_started_lines(text: str) -> dict[int, int]:
    """node rank -> launcher pid from the `gemm-started` lines of a run step's output."""
    found: dict[int, int] = {}
    for line in text.splitlines():
        match = _STARTED_LINE.match(line)
        if match:
            found[int(match.group(1))] = int(match.group(2))
    return found


def stop_command(registry_dir: str | None, run_id: str | None, grace: float, kill: bool,
                 all_users: bool = False) -> str:
    """Stop one run's processes on a node (run_id None: every active run of ours there).

    kill: SIGKILL at once (emergency). Otherwise SIGTERM to each launcher (which forwards it to
    torchrun's group and records the end), wait up to `grace` seconds, then SIGKILL what is left.
    all_users (root only, refused on the node otherwise): every user's registry in its default
    place, each entry's processes matched with its registry owner's uid.
    Prints one `stopped run=... node=... state=... exit_code=... survivors=... user=...` line per
    entry (see parse_stop_output); exits 1 when some process survived SIGKILL.
    """
    registry = _registry_arg(registry_dir)
    if run_id is not None:
        validate_run_id(run_id)
    if not (grace >= 0 and math.isfinite(grace)):
        raise RegistryError(f"grace {grace!r} must be a number of seconds >= 0")
    polls = math.ceil(grace / STOP_POLL_SECONDS)
    script = (_STOP_SH.replace("LAUNCHER_RECORD_POLLS", str(LAUNCHER_RECORD_POLLS))
              .replace("KILL_CONFIRM_POLLS", str(KILL_CONFIRM_POLLS)))
    return _one_shot(script, "gemm-stop", [registry, run_id or "", "kill" if kill else "stop",
                                           polls, "all" if all_users else "mine"])


def status_command(registry_dir: str | None, run_id: str | None = None, recent: int = 10) -> str:
    """Print this host's registry entries: every active one, plus the `recent` latest finished.

    Output is for parse_status (blocks of key=value lines). A registry another user could have
    tampered with is refused (exit 1, the reason on stderr), never read.
    """
    registry = _registry_arg(registry_dir)
    if run_id is not None:
        validate_run_id(run_id)
    return _one_shot(_STATUS_SH, "gemm-status", [registry, run_id or "", max(0, int(recent))])


def logs_command(registry_dir: str | None, run_id: str, follow: bool,
                 lines: int | None = None) -> str:
    """Print `@@ node_rank N`, then the node's output log of the run (the last `lines`, or all).

    follow: keep printing new lines until the run's launcher exits. Exits 3 when this host has no
    entry for the run.
    """
    registry = _registry_arg(registry_dir)
    validate_run_id(run_id)
    count = "all" if lines is None else str(max(0, int(lines)))
    script = _LOGS_SH.replace("EXIT_NO_SUCH_RUN", str(EXIT_NO_SUCH_RUN))
    return _one_shot(script, "gemm-logs", [registry, run_id, "1" if follow else "0", count])


def render_node_launcher(
    *,
    run_id: str,
    registry_dir: str | None,
    run_dir: str,
    output_dir: str,
    env_script: str,
    workdir: str,
    torchrun_argv: list[str],
    wrapper_argv: list[str] | None,
    container: str | None,
    venv: str | None,
    venv_required: bool = True,
    master_port: int | str = "",
    ranks_dir: str | None = None,
) -> str:
    """The node launcher (bash), one file for every node: `bash node_launcher.sh NODE_RANK`.

    It adds `--node-rank=<rank>` right after torchrun_argv[0] and runs
    `[wrapper_argv...] torchrun --node-rank=<rank> torchrun_argv[1:]...` in `ranks_dir`
    (default: `workdir`; an entry script's own directory) with env.sh sourced, bare (venv
    activated) or through `docker exec` into `container`. A venv that is not `venv_required`
    (the <workdir>/.venv default) is activated only where it exists.
    On node 0 it refuses to start torchrun while someone listens on `master_port`, naming them.
    """
    validate_run_id(run_id)
    _registry_arg(registry_dir)
    ranks_dir = ranks_dir or workdir
    for value, what in ((run_dir, "run_dir"),
                        (output_dir, "output_dir"), (env_script, "env_script"),
                        (workdir, "workdir"), (ranks_dir, "ranks_dir")):
        validate_node_path(value, what)
    if venv is not None:
        validate_node_path(venv, "venv")
    if container is not None and not CONTAINER_NAME.fullmatch(container):
        raise RegistryError(f"container name {container!r}: letters, digits, '_', '.', '-'")
    if not torchrun_argv:
        raise RegistryError("torchrun_argv is empty")
    for arg in [*torchrun_argv, *(wrapper_argv or [])]:
        if not isinstance(arg, str) or "\0" in arg:
            raise RegistryError(f"command argument {arg!r} is not a string without NUL bytes")
    return render_template(
        LAUNCHER_TEMPLATE,
        run_id=run_id,
        registry_dir=registry_dir or "",
        run_dir=run_dir,
        output_dir=output_dir,
        env_script=env_script,
        workdir=workdir,
        ranks_dir=ranks_dir,
        torchrun_argv=list(torchrun_argv),
        wrapper_argv=list(wrapper_argv or []),
        container=container or "",
        venv=venv or "",
        venv_required=venv_required,
        command_json=json.dumps([*(wrapper_argv or []), *torchrun_argv]),
        master_port=master_port,
        shell_lib=SHELL_LIB + PORT_HOLDERS_SH,
    )


# -- parsing what the nodes print -----------------------------------------------------------------

@dataclass(frozen=True)
class NodeRunRecord:
    """One node's registry entry of one run, as its host reported it."""

    run_id: str
    node_rank: int
    state: str
    exit_code: int | None
    started_at: str | None
    ended_at: str | None
    pid_alive: bool
    steps_done: int | None
    output_log: str | None
    procs: int = 0                  # processes carrying the run's markers on the host now
    host: str | None = None         # the node's own name for itself (uname -n)
    user: str | None = None
    container: str | None = None
    output_dir: str | None = None
    run_dir: str | None = None
    launcher_pid: int | None = None
    entry: str | None = None        # the registry entry's directory

    @property
    def active(self) -> bool:
        """Something of the run is alive on the node (or it never recorded an end)."""
        return self.pid_alive or self.procs > 0 or self.state in ACTIVE_STATES

    @property
    def lost(self) -> bool:
        """Recorded as running but nothing of it is left: the launcher died without recording."""
        return self.state in ACTIVE_STATES and not self.pid_alive and self.procs == 0


def _int_or_none(text: str | None) -> int | None:
    text = (text or "").strip()
    try:
        return int(text)
    except ValueError:
        return None


def parse_status(text: str) -> list[NodeRunRecord]:
    """The records printed by status_command; malformed blocks are skipped, not guessed at."""
    records: list[NodeRunRecord] = []
    block: dict[str, str] | None = None

    def flush() -> None:
        if block is None:
            return
        rank = _int_or_none(block.get("node_rank"))
        if not block.get("run_id") or rank is None:
            return
        records.append(NodeRunRecord(
            run_id=block["run_id"],
            node_rank=rank,
            state=block.get("state") or "starting",
            exit_code=_int_or_none(block.get("exit_code")),
            started_at=block.get("started_at") or None,
            ended_at=block.get("ended_at") or None,
            pid_alive=block.get("pid_alive") == "1",
            steps_done=_int_or_none(block.get("steps_done")),
            output_log=block.get("output_log") or None,
            procs=_int_or_none(block.get("procs")) or 0,
            host=block.get("host") or None,
            user=block.get("user") or None,
            container=block.get("container") or None,
            output_dir=block.get("output_dir") or None,
            run_dir=block.get("run_dir") or None,
            launcher_pid=_int_or_none(block.get("launcher.pid")),
            entry=block.get("entry") or None,
        ))

    for line in text.splitlines():
        if line.startswith("@@ "):
            flush()
            block = {} if line == "@@ entry" else None
        elif block is not None and "=" in line:
            key, _, value = line.partition("=")
            block[key] = value
    flush()
    return records


@dataclass(frozen=True)
class StopOutcome:
    """What stop_command did to one node's entry of a run."""

    run_id: str
    node_rank: int
    state: str
    exit_code: int | None
    survivors: tuple[int, ...]
    user: str | None = None      # whose run it was (emergency-stop --all-users reaches others')
    # False for another user's entry (root's --all-users): signalled, never written to.
    recorded: bool = True


def parse_stop_output(text: str) -> list[StopOutcome]:
    outcomes = []
    for line in text.splitlines():
        if not line.startswith("stopped "):
            continue
        fields = dict(part.partition("=")[::2] for part in line.split()[1:])
        rank = _int_or_none(fields.get("node"))
        if not fields.get("run") or rank is None:
            continue
        survivors = fields.get("survivors", "-")
        outcomes.append(StopOutcome(
            run_id=fields["run"],
            node_rank=rank,
            state=fields.get("state", ""),
            exit_code=_int_or_none(fields.get("exit_code")),
            survivors=tuple(int(p) for p in survivors.split(",") if p.isdigit()),
            user=fields.get("user") or None,
            recorded=fields.get("recorded") != "no",
        ))
    return outcomes


def latest_run_id(records: Sequence[NodeRunRecord]) -> str | None:
    """The run started last (ISO timestamps sort as text)."""
    dated = [r for r in records if r.started_at]
    if not dated:
        return records[-1].run_id if records else None
    return max(dated, key=lambda r: (r.started_at, r.run_id)).run_id


__all__ = [
    "ACTIVE_STATES", "FINAL_STATES", "NodeRunRecord", "RegistryError", "StopOutcome",
    "entry_dir", "latest_run_id", "launcher_start_command", "logs_command", "parse_status",
    "parse_stop_output", "render_node_launcher", "status_command", "stop_command",
    "validate_run_id", "CONTAINER_NAME", "SHELL_LIB", "SCAN_KILL_SH",
]
