"""Environment knobs as sweep axes (`fab sweep --axis NAME=V1,V2`): parsing, checking the values
where the library documents them, and comparing what a point asked with what NCCL/RCCL used.

A misspelt algorithm costs a whole sweep: NCCL's list parser (src/graph/tuning.cc parseList,
NVIDIA/nccl v2.7 to v2.2x) compares each name with strcasecmp and silently ignores one it does
not know, so `NCCL_PROTO=Simpel` runs with NCCL's own choice and measures nothing. The names
below are NCCL's own tables (src/device.h / src/init.cc `ncclAlgoStr`, `ncclProtoStr`,
`ncclFuncStr`, v2.23+, which RCCL shares: ROCm/rccl src/include/nccl_common.h declares the same
7 algorithms and 3 protocols); `CollNet` is the single CollNet algorithm of NCCL 2.7 to 2.11.
Since 2.24 a value may map collectives to lists, `allreduce:tree,ring;broadcast:ring`, each list
optionally starting with `^` (everything but); that syntax is accepted too.

Pure: no files, no network.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from tasks.lib.masking import DEFAULT_SECRET_ENV_PATTERNS, is_secret_name
from tasks.lib.quoting import is_env_name

ALGORITHMS = ("Tree", "Ring", "CollNetDirect", "CollNetChain", "NVLS", "NVLSTree", "PAT", "CollNet")
PROTOCOLS = ("LL", "LL128", "Simple")
FUNCTIONS = ("Broadcast", "Reduce", "AllGather", "ReduceScatter", "AllReduce")
MAX_VALUE_CHARS = 128
_VALUE = re.compile(r"^[A-Za-z0-9_.:;^=+/-]+$")


class KnobError(ValueError):
    """An axis that cannot be swept; one line saying what and how to fix it."""


@dataclass(frozen=True)
class Axis:
    """One environment variable of a sweep and its values, in the order given."""

    name: str
    values: tuple[str, ...]


def _name_list(names: Sequence[str], what: str) -> Callable[[str], str | None]:
    """A checker of NCCL's `[func:][^]name,name;func:...` lists against `names`."""
    known = {n.lower(): n for n in names}
    functions = {f.lower() for f in FUNCTIONS}

    def check(value: str) -> str | None:
        for index, entry in enumerate(value.split(";")):
            prefix, sep, items = entry.rpartition(":")
            if sep and prefix.lower() not in functions:
                return f"{prefix!r} is not a collective ({', '.join(FUNCTIONS)})"
            if not sep and index > 0:
                return "every entry but the first needs a collective prefix (allreduce:...)"
            names_given = items[1:] if items.startswith("^") else items
            for item in names_given.split(","):
                if item.lower() not in known:
                    return f"{item!r} is not a {what} ({', '.join(names)}; any case)"
        return None

    return check


def _integer(low: int, high: int | None = None) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if not value.isdigit() or int(value) < low or (high is not None and int(value) > high):
            return f"expected an integer {'>= ' + str(low) if high is None else f'{low}..{high}'}"
        return None
    return check


# Variables whose values NCCL's documentation lists (docs.nvidia.com/deeplearning/nccl, "Environment
# Variables"). Others are allowed with a warning: RCCL and newer NCCL add knobs faster than any list.
KNOWN: dict[str, Callable[[str], str | None]] = {
    "NCCL_ALGO": _name_list(ALGORITHMS, "NCCL algorithm"),
    "NCCL_PROTO": _name_list(PROTOCOLS, "NCCL protocol"),
    "NCCL_BUFFSIZE": _integer(1),
    "NCCL_NSOCKS_PERTHREAD": _integer(1),
    "NCCL_SOCKET_NTHREADS": _integer(1),
    "NCCL_IB_DISABLE": _integer(0, 1),
    "NCCL_P2P_DISABLE": _integer(0, 1),
    "NCCL_SHM_DISABLE": _integer(0, 1),
}


def parse_axes(items: Iterable[str] | None, *, reserved: dict[str, str],
               secret_patterns: Sequence[str] = DEFAULT_SECRET_ENV_PATTERNS) -> tuple[list[Axis], list[str]]:
    """`--axis NAME=V1,V2` items as axes, and the warnings to print (unknown names). KnobError for
    a malformed item, a name the launch sets itself (`reserved`: name -> the flag to use), a
    secret-looking name (its values would be recorded in clear), a value the library documents
    otherwise, or a name given twice."""
    axes: list[Axis] = []
    warnings: list[str] = []
    for item in items or []:
        name, sep, text = str(item).partition("=")
        name = name.strip()
        if not sep or not text.strip():
            raise KnobError(f"--axis {item!r}: expected NAME=VALUE1,VALUE2 (e.g. --axis NCCL_PROTO=Simple,LL128)")
        if not is_env_name(name):
            raise KnobError(f"--axis {name!r} is not a valid variable name (letters, digits and _)")
        if name in reserved:
            raise KnobError(f"--axis {name}: the launch sets it; use {reserved[name]} instead")
        if is_secret_name(name, secret_patterns):
            raise KnobError(f"--axis {name}: the name looks secret (launch.secret_env_patterns) and an "
                            "axis's values are recorded in clear in sweep.json and results.csv")
        if any(axis.name == name for axis in axes):
            raise KnobError(f"--axis {name} is given twice; list its values once: --axis {name}=A,B")
        values: list[str] = []
        for raw in text.split(","):
            value = raw.strip()
            if not value:
                continue
            if len(value) > MAX_VALUE_CHARS or not _VALUE.match(value):
                raise KnobError(f"--axis {name}: value {value[:40]!r} must be at most {MAX_VALUE_CHARS} "
                                "characters of letters, digits and _ . : ; ^ = + / -")
            checker = KNOWN.get(name)
            problem = checker(value) if checker else None
            if problem:
                raise KnobError(f"--axis {name}={value}: {problem}")
            if value not in values:
                values.append(value)
        if not values:
            raise KnobError(f"--axis {item!r}: no values")
        if name not in KNOWN:
            library = name.startswith(("NCCL_", "RCCL_"))
            warnings.append(f"--axis {name}: not a variable whose values this tool checks"
                            + (" (a newer or RCCL-only knob?): its values go to the ranks as given; "
                               "the report flags it where the library never reported reading it"
                               if library else "; its values go to the ranks as given"))
        axes.append(Axis(name, tuple(values)))
    return axes, warnings


# -- what the library used ---------------------------------------------------------------------

def allowed(value: str, names: Sequence[str], function: str = "AllReduce") -> set[str] | None:
    """The names (upper case) a NCCL list value allows for `function`; None when it does not say."""
    chosen = None
    for index, entry in enumerate(value.split(";")):
        prefix, sep, items = entry.rpartition(":")
        if not sep and index == 0:
            chosen = chosen if chosen is not None else items
        elif prefix.lower() == function.lower():
            chosen = items
    if chosen is None:
        return None
    everything = {n.upper() for n in names}
    if chosen.startswith("^"):
        return everything - {n.upper() for n in chosen[1:].split(",")}
    return {n.upper() for n in chosen.split(",")}


def effective_mismatch(name: str, asked: str, used: Iterable[str]) -> str | None:
    """Where the per-collective TUNING lines (`used`: "ALGO/PROTO" of each data collective, as in
    summary.json's effective_settings.algorithms) contradict an NCCL_ALGO / NCCL_PROTO axis value:
    the flag text, else None."""
    pairs = [u.split("/", 1) for u in used if "/" in u]
    if name == "NCCL_ALGO":
        wanted, seen = allowed(asked, ALGORITHMS), {a.upper().replace("_", "") for a, _ in pairs}
        wanted = {w.replace("_", "") for w in wanted} if wanted is not None else None
    elif name == "NCCL_PROTO":
        wanted, seen = allowed(asked, PROTOCOLS), {p.upper() for _, p in pairs}
    else:
        return None
    if wanted is None or not seen or seen <= wanted:
        return None
    return (f"{name}={asked} asked, but the collectives ran with {', '.join(sorted(seen - wanted))} "
            f"(TUNING: {', '.join(sorted(set(used)))})")
