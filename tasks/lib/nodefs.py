"""What we write or run on a node must sit where no other user of that node can change it.

GPU nodes are shared and /tmp is writable by everyone: a directory another user can write lets
them rename ours away and put theirs (or a symlink) in its place, and a file they own is theirs
to rewrite between our check and our use. So every directory we write into or run from is
checked the way OpenSSH's StrictModes checks ~/.ssh: each directory from / down to it is owned
by root or by us and writable by nobody else (a sticky directory such as /tmp excepted), and the
directory itself is ours; directories we create are made mode 0700, one level at a time (never
`mkdir -p`, which accepts whatever it finds). Files are checked right before use: a regular file
(not a symlink) of ours that nobody else may write.

The checks are bash functions (SAFE_FS_SH) because they run on the node, which needs nothing
but bash and coreutils; tasks/lib/registry.py includes them in its shell library. Pure strings.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from tasks.lib.quoting import sh_join, sh_quote

# The registry's default place: per user, so no other user can pre-create it, plant entries or
# symlinks in it, or fill it. Not $XDG_RUNTIME_DIR: logind removes /run/user/<uid> when the
# user's last session ends, which would delete the registry of a detached run (and pull the
# bind mount from under a container started by docker-up).
DEFAULT_REGISTRY_PREFIX = "/tmp/gemm-runs-"

SAFE_FS_SH = r"""# --- node filesystem safety (tasks/lib/nodefs.py) ---
# Runs before every launch, push and docker-up: forks only where it must (one stat per walk;
# names of users only in refusals).
GEMM_UID=${EUID:-$(id -u)}
gemm_user_of() { getent passwd "$1" 2>/dev/null | cut -d: -f1 | grep . || printf 'uid %s' "$1"; }
gemm_trusted() {
  if [ "$GEMM_UID" = 0 ]; then printf root; else printf '%s or root' "$(gemm_user_of "$GEMM_UID")"; fi
}
# The run registry: cluster.registry_dir when set ($1), else /tmp/gemm-runs-<uid>.
gemm_registry() { if [ -n "${1-}" ]; then printf '%s' "$1"; else printf '/tmp/gemm-runs-%s' "$GEMM_UID"; fi; }
# gemm_path_risk PATH: sets GEMM_RISK to why an existing entry on the way to PATH (or on the way
# to where its symlinks lead) may be changed by another user, or to "" when none can; sets
# GEMM_LAST to "owner mode" of PATH itself when it exists.
gemm_path_risk() {
  local cur= full= part real linked= parts=() comps=() owner mode kind name
  GEMM_RISK= GEMM_LAST=
  IFS=/ read -r -a parts <<<"${1#/}"
  for part in "${parts[@]}"; do [ -n "$part" ] && full=$full/$part; done
  for part in "${parts[@]}"; do
    [ -n "$part" ] || continue
    cur=$cur/$part
    if [ -L "$cur" ]; then linked=1; elif [ ! -e "$cur" ]; then break; fi
    comps+=("$cur")
  done
  [ "${#comps[@]}" -gt 0 ] || return 0
  if [ -n "$linked" ] && real=$(realpath -e -- "${comps[-1]}" 2>/dev/null); then
    cur=
    IFS=/ read -r -a parts <<<"${real#/}"
    for part in "${parts[@]}"; do [ -n "$part" ] || continue; cur=$cur/$part; comps+=("$cur"); done
  fi
  while IFS='|' read -r owner mode kind name; do
    [ "$name" = "$full" ] && GEMM_LAST="$owner $mode"
    [ -z "$GEMM_RISK" ] || continue
    if [ "$owner" != 0 ] && [ "$owner" != "$GEMM_UID" ]; then
      GEMM_RISK="$name is owned by $(gemm_user_of "$owner"), not by $(gemm_trusted)"
    elif [ "$kind" != "symbolic link" ] && (( (8#$mode & 8#022) && !(8#$mode & 8#1000) )); then
      GEMM_RISK="$name is writable by other users (mode $mode)"
    fi
  done < <(stat -c '%u|%a|%F|%n' -- "${comps[@]}" 2>/dev/null)
}
gemm_refuse_risk() {
  echo "refusing $1 $2: $GEMM_RISK; another user could replace what we write there. Fix the owner or mode, or choose another path" >&2
}
# gemm_safe_dir DIR WHAT [private]: create DIR (missing levels one at a time, mode 0700) and
# make sure no other user can change it (ours or root's); private: ours, and nobody else may
# even read it (mode 0700). Refuses (status 1, one line on stderr) otherwise.
gemm_safe_dir() {
  local dir=$1 what=$2 private=${3-} cur= part parts=() raced= info
  case $dir in /*) ;; *) echo "refusing $what $dir: not an absolute path" >&2; return 1;; esac
  IFS=/ read -r -a parts <<<"${dir#/}"
  dir=; for part in "${parts[@]}"; do [ -n "$part" ] && dir=$dir/$part; done  # no //
  [ -n "$dir" ] || { echo "refusing $what /: not a directory of ours" >&2; return 1; }
  # What exists of the path is judged before anything is created in it.
  gemm_path_risk "$dir"
  [ -z "$GEMM_RISK" ] || { gemm_refuse_risk "$what" "$dir"; return 1; }
  info=$GEMM_LAST
  IFS=/ read -r -a parts <<<"${dir#/}"
  for part in "${parts[@]}"; do
    [ -n "$part" ] || continue
    cur=$cur/$part
    # An existing entry (a symlink too) is never replaced: it is judged below.
    [ -e "$cur" ] || [ -L "$cur" ] && continue
    if mkdir -m 700 -- "$cur" 2>/dev/null; then
      [ "$cur" = "$dir" ] && info="$GEMM_UID 700"
    elif [ -d "$cur" ]; then raced=1
    else echo "refusing $what $dir: cannot create $cur" >&2; return 1
    fi
  done
  if [ -L "$dir" ] || [ ! -d "$dir" ]; then
    echo "refusing $what $dir: it is a symlink or not a directory (another user may have planted it); remove it, or choose another path" >&2
    return 1
  fi
  # Made by someone else after our look (another node writing the same path of a shared
  # filesystem): nothing is known about it yet.
  [ -n "$info" ] || raced=1
  if [ -n "$raced" ]; then  # someone made a level between our look and our mkdir: look again
    gemm_path_risk "$dir"
    [ -z "$GEMM_RISK" ] || { gemm_refuse_risk "$what" "$dir"; return 1; }
    info=$GEMM_LAST
  fi
  # Root's directories are as safe as ours (a checkout installed by root); a private one we
  # write into must be ours.
  if [ "${info% *}" != "$GEMM_UID" ] && { [ -n "$private" ] || [ "${info% *}" != 0 ]; }; then
    echo "refusing $what $dir: owned by $(gemm_user_of "${info% *}"), not by $(gemm_user_of "$GEMM_UID"); remove it (it is not yours), or choose another path" >&2
    return 1
  fi
  if [ -n "$private" ] && (( 8#${info#* } & 8#077 )); then
    echo "refusing $what $dir: mode ${info#* } lets other users in (want 700): chmod 700 it" >&2
    return 1
  fi
}
# gemm_safe_file FILE WHAT: FILE is a regular file of ours (not a symlink) that only we may
# write, in a directory no other user can change. Checked right before FILE is used.
gemm_safe_file() {
  local file=$1 what=$2
  if [ -L "$file" ] || [ ! -f "$file" ]; then
    echo "refusing $what $file: a symlink or not a regular file" >&2; return 1
  fi
  gemm_path_risk "$file"
  [ -z "$GEMM_RISK" ] || { echo "refusing $what $file: $GEMM_RISK" >&2; return 1; }
  if [ "${GEMM_LAST% *}" != "$GEMM_UID" ]; then
    echo "refusing $what $file: owned by $(gemm_user_of "${GEMM_LAST% *}") with mode ${GEMM_LAST#* }; it must be ours and writable only by us" >&2
    return 1
  fi
}
# gemm_safe_venv VENV: the venv the ranks' Python comes from (activated by the launcher, its
# py-spy run by diagnose, as root there) can be changed by nobody but us or root: every directory
# down to its bin/, the venv's directories and pyvenv.cfg (Python reads its home from it), what
# bin/ holds (followed where they are symlinks: python is one) and its site-packages directories.
# Other files at the top (a uv .lock, CACHEDIR.TAG: an H100 image's venv has a 666 .lock) are
# neither run nor read by Python; deeper files are not walked (a venv holds thousands).
gemm_safe_venv() {
  local venv=$1 bad
  gemm_path_risk "$venv/bin"
  [ -z "$GEMM_RISK" ] || { echo "refusing the venv (cluster.venv) $venv: $GEMM_RISK" >&2; return 1; }
  bad=$( { find -L "$venv" -maxdepth 1 \( -type d -o -name pyvenv.cfg \) -print0
           find -L "$venv/bin" -maxdepth 1 -print0; } 2>/dev/null |
         find -L -files0-from - -maxdepth 0 \( ! -uid 0 ! -uid "$GEMM_UID" -o -perm /022 \
           ! \( -type d -perm -1000 \) \) -printf '%p|%u|%m\n' 2>/dev/null | head -n 1)
  [ -n "$bad" ] || bad=$(find -L "$venv"/lib*/python*/site-packages -maxdepth 0 \
          \( ! -uid 0 ! -uid "$GEMM_UID" -o -perm /022 \) -printf '%p|%u|%m\n' 2>/dev/null | head -n 1)
  if [ -n "$bad" ]; then
    IFS='|' read -r bad owner mode <<<"$bad"
    echo "refusing the venv (cluster.venv) $venv: $bad is owned by $owner with mode $mode; another user could change what the ranks run. Make it $(gemm_trusted)'s and writable only by its owner, or choose another venv" >&2
    return 1
  fi
}
# --- end of node filesystem safety ---
"""


def with_safe_fs(script: str) -> str:
    """`bash -c` of `script` with the SAFE_FS_SH functions defined (whatever the login shell)."""
    return f"bash -c {sh_quote(SAFE_FS_SH + script)}"


def safe_dirs_command(dirs: Iterable[str], *, private: bool = True, what: str = "directory") -> str:
    """bash: create (0700) and check every directory, in order; exits 1 at the first refused."""
    calls = [f"gemm_safe_dir {sh_quote(d)} {sh_quote(what)}{' private' if private else ''} || exit 1"
             for d in dirs]
    return with_safe_fs("\n".join(calls) + "\n")


def checked_file_command(path: str, what: str, argv: Sequence[str]) -> str:
    """bash: run argv only if `path` passes gemm_safe_file right before (exit 1 otherwise).

    For files another program reads as instructions (a compose file makes `docker compose`
    start containers as root): checked as late as possible, in the same process that runs it.
    """
    check = f"gemm_safe_file {sh_quote(path)} {sh_quote(what)} || exit 1\n"
    return with_safe_fs(check + "exec " + sh_join(argv) + "\n")


def registry_for_uid(registry_dir: str | None, uid: int) -> str:
    """The same registry as seen from the controller, once a node's uid is known (the probe)."""
    return registry_dir or f"{DEFAULT_REGISTRY_PREFIX}{int(uid)}"


__all__ = ["SAFE_FS_SH", "DEFAULT_REGISTRY_PREFIX", "with_safe_fs", "safe_dirs_command",
           "checked_file_command", "registry_for_uid"]
