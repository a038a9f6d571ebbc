"""Hang detection from per-rank progress: pure, clock injected by the caller.

Progress per rank is a monotonically growing counter (metrics lines written, or the step of a
`step N/M` progress line) plus the step it corresponds to. The run is hung when no rank has
advanced for `timeout_s` seconds while its processes live. The rank(s) that stopped advancing
first are the ones with the least progress; among those, the ones that advanced last the earliest.
In a data-parallel run every rank blocks in the same collective within one step, so several ranks
often tie: the diagnostics (process states, stacks) narrow that down afterwards.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tasks.lib import untrusted
from tasks.lib.quoting import sh_quote

METRICS_FILE = re.compile(r"rank_([0-9]{1,9})_metrics\.jsonl$")
# "step 12/100" anywhere in a line, optionally prefixed by "[rank 3]" or "rank 3:" at its start
# (torchrun's --tee prefixes "[3]:"). Two patterns, each linear in the line: one pattern with
# ".*?" between prefix and step retried the rest of the line from every position (a 16 KiB
# line without "step" took 1.5 s, a hostile 44 KiB one 25 s). ASCII digits, bounded.
STEP_LINE = re.compile(r"\bstep\s+(?P<step>[0-9]{1,12})\s*/\s*(?P<total>[0-9]{1,12})(?![0-9])",
                       re.IGNORECASE)
RANK_PREFIX = re.compile(
    r"\[(?:rank\s*)?(?P<rank1>[0-9]{1,9})\]\s*:?|\brank\s*(?P<rank2>[0-9]{1,9})\s*[:|]",
    re.IGNORECASE)


@dataclass
class RankProgress:
    rank: int
    progress: int | None = None       # the counter: lines seen, or the step
    step: int | None = None           # the training step the progress corresponds to
    last_advance_at: float | None = None
    slowest_step_s: float | None = None  # longest time per unit of progress seen between advances



@dataclass(frozen=True)
class HangReport:
    """What the watchdog knew when it declared the hang (run.json's `hang` record)."""

    detected_at: float
    timeout_s: float
    last_progress_at: float        # the latest advance of any rank (or the watch start)
    ranks: tuple[RankProgress, ...]
    first_stalled: tuple[int, ...]  # from progress alone
    missing: tuple[int, ...] = ()   # expected ranks never seen

    @property
    def stalled_for_s(self) -> float:
        return self.detected_at - self.last_progress_at

    def steps(self) -> dict[int, int | None]:
        return {r.rank: r.step for r in self.ranks}

    def as_dict(self) -> dict[str, Any]:
        """For run.json. The clock is the caller's (often monotonic): only durations go out."""
        return {
            "timeout_s": self.timeout_s,
            "stalled_for_s": round(self.stalled_for_s, 3),
            "first_stalled_ranks": list(self.first_stalled),
            "missing_ranks": list(self.missing),
            "rank_steps": {str(r.rank): r.step for r in self.ranks},
            "ranks": [{"rank": r.rank, "progress": r.progress, "step": r.step,
                       "idle_s": None if r.last_advance_at is None
                       else round(self.detected_at - r.last_advance_at, 3)}
                      for r in self.ranks],
        }


@dataclass
class HangWatchdog:
    """Feed it progress with `observe`, ask `check(now, alive)` on every watch-loop tick."""

    timeout_s: float
    started_at: float
    expected_ranks: Iterable[int] | None = None
    # Until the first rank advances (imports, rendezvous, NCCL init, calibration, warm-up: no
    # metrics lines yet) the limit is max(timeout_s, startup_timeout_s).
    startup_timeout_s: float | None = None
    # Derived limit (the launch's default): once ranks advance, a hang is declared after
    # step_multiple × the slowest step seen (at least floor_s), never later than timeout_s.
    # None: timeout_s as given (the user chose it).
    step_multiple: float | None = None
    floor_s: float = 60.0
    ranks: dict[int, RankProgress] = field(default_factory=dict)
    last_progress_at: float = field(init=False)
    fired: HangReport | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"hang timeout must be positive, got {self.timeout_s}")
        self.last_progress_at = self.started_at
        self.expected_ranks = tuple(sorted(set(self.expected_ranks or ())))
        for rank in self.expected_ranks:
            self.ranks.setdefault(rank, RankProgress(rank))

    def observe(self, rank: int, progress: int, now: float, step: int | None = None) -> bool:
        """Record that `rank` has reached `progress`; True when that is an advance."""
        entry = self.ranks.setdefault(rank, RankProgress(rank))
        if entry.progress is None and progress <= 0:
            entry.progress = 0  # an empty metrics file: the rank is there, but has done nothing
            return False
        if entry.progress is not None and progress <= entry.progress:
            return False
        if entry.progress is not None and entry.last_advance_at is not None and progress > entry.progress:
            per_step = (now - entry.last_advance_at) / (progress - entry.progress)
            entry.slowest_step_s = max(entry.slowest_step_s or 0.0, per_step)
        entry.progress = progress
        if step is not None:
            entry.step = step
        entry.last_advance_at = now
        self.last_progress_at = max(self.last_progress_at, now)
        return True

    def observe_poll(self, snapshot: dict[int, tuple[int, int | None]], now: float) -> list[int]:
        """Feed one `parse_progress_poll` result; returns the ranks that advanced."""
        return [rank for rank, (progress, step) in sorted(snapshot.items())
                if self.observe(rank, progress, now, step)]

    def idle_for(self, now: float) -> float:
        return now - self.last_progress_at

    @property
    def limit_s(self) -> float:
        """The idle time that counts as a hang now."""
        if self.startup_timeout_s and not any(r.last_advance_at for r in self.ranks.values()):
            return max(self.timeout_s, self.startup_timeout_s)
        slowest = self.slowest_step_s
        if self.step_multiple and slowest is not None:
            return min(self.timeout_s, max(self.floor_s, self.step_multiple * slowest))
        return self.timeout_s

    @property
    def slowest_step_s(self) -> float | None:
        seen = [r.slowest_step_s for r in self.ranks.values() if r.slowest_step_s is not None]
        return max(seen) if seen else None

    def check(self, now: float, alive: bool = True) -> HangReport | None:
        """A HangReport once no rank advanced for timeout_s while the processes live, else None.

        Fires once: later calls return the same report.
        """
        if self.fired is not None:
            return self.fired
        if not alive or self.idle_for(now) < self.limit_s:
            return None
        ranks = tuple(self.ranks[r] for r in sorted(self.ranks))
        missing = tuple(r.rank for r in ranks if r.progress is None)
        self.fired = HangReport(
            detected_at=now,
            timeout_s=self.limit_s,
            last_progress_at=self.last_progress_at,
            ranks=tuple(RankProgress(**vars(r)) for r in ranks),
            first_stalled=first_stalled_ranks(ranks),
            missing=missing,
        )
        return self.fired


# The launch's default hang limit: this fraction of the train package's collective timeout
# (distributed.timeout_s), so the watchdog takes its stacks before the NCCL watchdog aborts the
# communicator; and, once steps are seen, HANG_STEP_MULTIPLE × the slowest step.
HANG_FRACTION_OF_COLLECTIVE_TIMEOUT = 0.8
HANG_STEP_MULTIPLE = 10.0


def default_hang_timeout(builtin_s: float, collective_timeout_s: float | None) -> float:
    """The hang limit when the user set none: the built-in, lowered below the collective timeout
    (a hang caught after the NCCL watchdog aborted the communicator has no stacks to take)."""
    if not collective_timeout_s or collective_timeout_s <= 0:
        return builtin_s
    return round(min(builtin_s, HANG_FRACTION_OF_COLLECTIVE_TIMEOUT * collective_timeout_s), 3)


def hang_timeout_warning(hang_timeout_s: float, collective_timeout_s: float | None) -> str | None:
    """The warning for a hang limit the user set at or above the collective timeout."""
    if hang_timeout_s <= 0 or not collective_timeout_s or hang_timeout_s < collective_timeout_s:
        return None
    return (f"hang timeout {hang_timeout_s:g} s >= distributed.timeout_s {collective_timeout_s:g} s: "
            "a hung collective is ended by the PyTorch/NCCL watchdog first, without the stacks; "
            f"lower --hang-timeout below {collective_timeout_s:g} (or leave it unset: "
            f"{HANG_FRACTION_OF_COLLECTIVE_TIMEOUT:g} x the collective timeout)")


def first_stalled_ranks(ranks: Iterable[RankProgress]) -> tuple[int, ...]:
    """Least progress first (never seen counts as least); ties broken by the earliest last advance.

    Poll-based observation quantizes times, so ranks that stopped within one poll tie and are all
    returned.
    """
    ranks = list(ranks)
    if not ranks:
        return ()
    never = [r.rank for r in ranks if r.progress is None]
    if never:
        return tuple(sorted(never))
    least = min(r.progress for r in ranks)  # type: ignore[type-var]
    laggards = [r for r in ranks if r.progress == least]
    earliest = min(r.last_advance_at or 0.0 for r in laggards)
    return tuple(sorted(r.rank for r in laggards if (r.last_advance_at or 0.0) == earliest))


# -- reading progress ---------------------------------------------------------------------------

def parse_progress_line(line: str) -> tuple[int, int] | None:
    """(rank, step) from one metrics JSON line or one `step N/M` progress line; None otherwise.

    A progress line without a rank marker is attributed to rank 0 (the train package prints
    progress from rank 0).
    """
    text = line.strip()
    if text.startswith("{"):
        try:
            record = untrusted.loads(text, max_bytes=untrusted.MAX_JSON_LINE_BYTES)
        except ValueError:
            return None
        if isinstance(record, dict):
            rank, step = untrusted.plain_int(record.get("rank")), untrusted.plain_int(record.get("step"))
            if rank is not None and step is not None:
                return rank, step
        return None
    prefix = RANK_PREFIX.match(text)
    match = STEP_LINE.search(text, prefix.end() if prefix else 0)
    if not match:
        return None
    rank = (prefix.group("rank1") or prefix.group("rank2")) if prefix else "0"
    return int(rank), int(match.group("step"))


def progress_poll_command(output_dir: str) -> str:
    """Node-side command: one line per metrics file, `<file>\\t<complete lines>\\t<last lines>`.

    The last two lines are sent (tab-separated; JSON escapes tabs inside strings) because the very
    last may still be half written. Cheap enough to run every few seconds: no Python start-up.
    """
    return (
        f"cd {sh_quote(output_dir)} 2>/dev/null || exit 0; "
        "for f in rank_*_metrics.jsonl; do [ -f \"$f\" ] || continue; "
        "n=$(wc -l < \"$f\"); last=$(tail -n 2 \"$f\" | tr -d '\\t' | tr '\\n' '\\t'); "
        "printf '%s\\t%s\\t%s\\n' \"$f\" \"$n\" \"$last\"; done"
    )


def parse_progress_poll(text: str) -> dict[int, tuple[int, int | None]]:
    """{rank: (lines written, step of the last complete line)} from `progress_poll_command`."""
    snapshot: dict[int, tuple[int, int | None]] = {}
    for line in text.splitlines():
        parts = line.rstrip("\t").split("\t", 2)
        if len(parts) < 2:
            continue
        match = METRICS_FILE.search(parts[0])
        count = untrusted.int_text(parts[1])
        if not match or count is None or count < 0:
            continue
        # wc counts newlines, so a half-written last line is not counted and does not parse.
        step = None
        for candidate in reversed(parts[2].split("\t") if len(parts) == 3 else []):
            parsed = parse_progress_line(candidate)
            if parsed is not None:
                step = parsed[1]
                break
        snapshot[int(match.group(1))] = (count, step)
    return snapshot
