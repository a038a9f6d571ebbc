"""The report's figures as PNG files (matplotlib, headless).

matplotlib is imported inside the functions: it costs most of a second, and `fab --list` must
not pay for it. Every figure is written with the Agg backend, so no display is needed.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.lib.report import COMPLETED, Decision, PointRow, pareto_front
from tasks.lib.untrusted import short_text

ITERATION_HEATMAP = "heatmap_iter_ms.png"
CONTENTION_HEATMAP = "heatmap_contention_slowdown.png"
BUSBW_LINES = "busbw_vs_channels.png"
PER_RANK_STEPS = "per_rank_step_time.png"
PARETO = "pareto_contention_exposed.png"

STATUS_SHORT = {"not_run": "not run", "no_output": "no output"}


def status_label(status: str) -> str:
    """A point's status on a figure: short words for ours, a node's own cut to fit a cell."""
    return STATUS_SHORT.get(status) or short_text(status, 24) or "?"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    # Statuses, hosts and notes on the figures come from the nodes: drawn as plain text, never
    # parsed as mathtext (a "$\\frac{$" in a status would make savefig raise).
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    return plt


def grid_axes(rows: Sequence[PointRow]) -> tuple[list[int], list[int]]:
    """Sorted channel and thread values present in the rows."""
    channels = sorted({r.channels for r in rows if r.channels is not None})
    threads = sorted({r.threads for r in rows if r.threads is not None})
    return channels, threads


def plot_heatmap(rows: Sequence[PointRow], value_of: Callable[[PointRow], float | None], *,
                 title: str, colorbar_label: str, cell_format: Callable[[float], str],
                 path: Path, mark: PointRow | None = None, mark_label: str = "",
                 also: Sequence[PointRow] = (), also_label: str = "") -> Path | None:
    """Channels across, threads up; each cell annotated with its value, or the point's status when
    it has none. Lower is better for both metrics we draw, so the colour map runs dark = low."""
    channels, threads = grid_axes(rows)
    if not channels or not threads:
        return None
    plt = _pyplot()
    import numpy as np

    values = np.full((len(threads), len(channels)), np.nan)
    labels = [["" for _ in channels] for _ in threads]
    for row in rows:
        if row.channels is None or row.threads is None:
            continue
        y, x = threads.index(row.threads), channels.index(row.channels)
        value = value_of(row)
        if value is not None and row.status == COMPLETED:
            values[y, x] = value
            labels[y][x] = cell_format(value)
        elif value is not None:
            # Partial figures of a failed run stay grey: they must not compete with real points.
            labels[y][x] = f"{cell_format(value)}\n({status_label(row.status)})"
        else:
            labels[y][x] = status_label(row.status)

    width = max(5.5, 1.35 * len(channels) + 3.0)
    height = max(3.2, 0.95 * len(threads) + 2.0)
    fig, ax = plt.subplots(figsize=(width, height), dpi=120)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")
    masked = np.ma.masked_invalid(values)
    finite = values[np.isfinite(values)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5 * abs(vmin or 1.0), vmax + 0.5 * abs(vmax or 1.0)
    image = ax.imshow(masked, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower", aspect="auto")
    ax.set_xticks(range(len(channels)), [str(c) for c in channels])
    ax.set_yticks(range(len(threads)), [str(t) for t in threads])
    ax.set_xlabel("NCCL channels (NCCL_MIN/MAX_NCHANNELS)")
    ax.set_ylabel("threads per block")
    ax.set_title(title)
    for y in range(len(threads)):
        for x in range(len(channels)):
            if not labels[y][x]:
                continue
            value = values[y, x]
            if math.isnan(value):
                color = "#444444"
            else:
                # Dark text on the light (high) end of viridis, white on the dark end.
                color = "black" if (value - vmin) / (vmax - vmin) > 0.55 else "white"
            ax.text(x, y, labels[y][x], ha="center", va="center", color=color, fontsize=10)
    for other in also:
        if other.channels in channels and other.threads in threads and other is not mark:
            x, y = channels.index(other.channels), threads.index(other.threads)
            ax.add_patch(plt.Rectangle((x - 0.45, y - 0.45), 0.9, 0.9, fill=False, edgecolor="#f0a202",
                                       linewidth=2, linestyle="--"))
    if also and also_label:
        ax.text(0.0, -0.16 if len(threads) > 1 else -0.25, f"dashed: {also_label}", transform=ax.transAxes,
                ha="left", va="top", fontsize=8, color="#b07800")
    if mark is not None and mark.channels in channels and mark.threads in threads:
        x, y = channels.index(mark.channels), threads.index(mark.threads)
        ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="#e4572e", linewidth=3))
        if mark_label:
            ax.text(1.0, -0.16 if len(threads) > 1 else -0.25, f"red box: {mark_label}", transform=ax.transAxes,
                    ha="right", va="top", fontsize=8, color="#e4572e")
    colorbar = fig.colorbar(image, ax=ax)
    colorbar.set_label(colorbar_label)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_busbw_vs_channels(rows: Sequence[PointRow], path: Path) -> Path | None:
    """Bus bandwidth against channels, one line per thread count (completed points only)."""
    usable = [r for r in rows if r.status == COMPLETED and r.busbw_gbps_median is not None
              and r.channels is not None and r.threads is not None]
    if not usable:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for threads in sorted({r.threads for r in usable}):
        line = sorted((r for r in usable if r.threads == threads), key=lambda r: r.channels)
        xs = [r.channels for r in line]
        ys = [r.busbw_gbps_median for r in line]
        ax.plot(xs, ys, marker="o", label=f"{threads} threads")
        for x, y in zip(xs, ys):
            # Label above the highest line at this channel count, below the others, so labels of
            # close lines do not overprint each other.
            top = max(r.busbw_gbps_median for r in usable if r.channels == x)
            offset, align = ((0, 7), "bottom") if y >= top else ((0, -8), "top")
            ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=offset, ha="center",
                        va=align, fontsize=8)
    ax.set_xticks(sorted({r.channels for r in usable}))
    ax.set_xlabel("NCCL channels")
    ax.set_ylabel("bus bandwidth, median (GB/s)")
    ax.set_title("Bus bandwidth under overlap vs channels")
    # All zero at world size 1: keep a visible axis instead of a singular one.
    ax.set_ylim(bottom=0, top=max(r.busbw_gbps_median for r in usable) * 1.18 or 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(title="threads per block")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_per_rank_step_time(panels: Sequence[tuple[str, Mapping[int, Sequence[tuple[int, float]]]]],
                            title: str, path: Path,
                            notes: Mapping[str, str] | None = None) -> Path | None:
    """Iteration time per step, one line per rank, one panel per run (a sweep gets a grid of
    panels on a shared y axis). Each panel names its slowest rank: from `notes` (panel name ->
    text: the train summary's rank the others waited for) when given, since a late rank's peers
    wait for it and their lines rise with its own; else the rank with the slowest median."""
    notes = notes or {}
    panels = [(name, series) for name, series in panels if series]
    if not panels:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(max(7.5, 3.6 * columns), 1.2 + 3.0 * rows), dpi=120,
                             sharey=True, squeeze=False)
    top = max(t for _, series in panels for points in series.values() for _, t in points)
    ranks = sorted({rank for _, series in panels for rank in series})
    colors = plt.get_cmap("tab10" if len(ranks) <= 10 else "tab20")
    for index, (name, series) in enumerate(panels):
        ax = axes[index // columns][index % columns]
        medians = {}
        for rank, points in sorted(series.items()):
            steps = [s for s, _ in points]
            times = [t for _, t in points]
            medians[rank] = _median(times)
            ax.plot(steps, times, marker="o" if len(steps) <= 40 else None, markersize=3, linewidth=1.2,
                    color=colors(ranks.index(rank) % colors.N), label=f"rank {rank}")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, top * 1.12)
        ax.grid(True, alpha=0.3)
        if notes.get(name):
            ax.text(0.02, 0.04, notes[name], transform=ax.transAxes, fontsize=8, color="#b00020")
        elif len(medians) > 1:
            slowest = max(medians, key=lambda r: medians[r])
            fastest = min(medians.values())
            spread = (medians[slowest] / fastest - 1) * 100 if fastest > 0 else 0.0
            ax.text(0.02, 0.04, f"slowest: rank {slowest} (+{spread:.1f} % vs fastest)",
                    transform=ax.transAxes, fontsize=8, color="#b00020" if spread > 5 else "#333333")
    for index in range(len(panels), rows * columns):
        axes[index // columns][index % columns].set_visible(False)
    for row_axes in axes:
        row_axes[0].set_ylabel("iteration time (ms)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if len(ranks) <= 16:
        fig.legend(handles, labels, loc="lower center", ncol=min(8, len(ranks)), fontsize=8,
                   bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07 if len(ranks) <= 8 else 0.11, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def settings_groups(rows: Sequence[PointRow]) -> list[tuple[str, list[PointRow]]]:
    """The rows split by their --axis values (a channels × threads heatmap each), with a file-name
    suffix per group ("" when the sweep has no other axis)."""
    groups: dict[tuple[tuple[str, str], ...], list[PointRow]] = {}
    for row in rows:
        groups.setdefault(tuple(row.settings.items()), []).append(row)
    named = []
    for settings, members in groups.items():
        suffix = "".join(f"_{_safe(k)}-{_safe(v)}" for k, v in settings)
        named.append((suffix, members))
    return named


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text)[:40]


def write_sweep_figures(rows: Sequence[PointRow], out_dir: Path,
                        decision: Decision | None = None) -> list[Path]:
    """Heatmaps (one per combination of the other axes), the busbw lines and the Pareto front;
    only when the rows span more than one point. The heatmap boxes the best point in red, or,
    where no point is ahead beyond the noise, the points that cannot be told apart in dashes."""
    channels, threads = grid_axes(rows)
    if len(rows) < 2 or (len(channels) * len(threads) < 2 and not any(r.settings for r in rows)):
        return []
    winner = decision.winner if decision else None
    tied = set(decision.within_noise) if decision and not decision.decided else set()
    written: list[Path | None] = []
    for suffix, members in settings_groups(rows):
        title_extra = (" " + " ".join(f"{k}={v}" for k, v in members[0].settings.items())) if suffix else ""
        best = next((r for r in members if r.label == winner), None)
        within = [r for r in members if r.label in tied]
        written += [
            plot_heatmap(members, lambda r: r.iter_ms_median, title="Median iteration time (ms)" + title_extra,
                         colorbar_label="iteration time, median (ms)", cell_format=lambda v: f"{v:.3g}",
                         path=out_dir / ITERATION_HEATMAP.replace(".png", f"{suffix}.png"), mark=best,
                         mark_label="best point (ahead beyond the noise)", also=within,
                         also_label="within noise of the leader: no single best point"),
            plot_heatmap(members, lambda r: None if r.contention_slowdown_median is None else r.contention_slowdown_median * 100,
                         title="GEMM contention slowdown (%)" + title_extra,
                         colorbar_label="GEMM time under overlap vs solo, median (%)",
                         cell_format=lambda v: f"{v:.1f} %",
                         path=out_dir / CONTENTION_HEATMAP.replace(".png", f"{suffix}.png")),
            plot_busbw_vs_channels(members, out_dir / BUSBW_LINES.replace(".png", f"{suffix}.png")),
        ]
    written.append(plot_pareto(rows, out_dir / PARETO, winner))
    return [p for p in written if p is not None]


def plot_pareto(rows: Sequence[PointRow], path: Path, winner: str | None = None) -> Path | None:
    """Contention slowdown against exposed communication, both lower-is-better: every completed
    point, the Pareto front (no point better on both) joined and labelled."""
    usable = [r for r in rows if r.status == COMPLETED and r.contention_slowdown_median is not None
              and r.exposed_comm_fraction_median is not None]
    if len(usable) < 2:
        return None
    front = pareto_front(usable)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.8, 4.6), dpi=120)
    xs = [r.contention_slowdown_median * 100 for r in usable]  # type: ignore[operator]
    ys = [r.exposed_comm_fraction_median * 100 for r in usable]  # type: ignore[operator]
    ax.scatter(xs, ys, color="#9e9e9e", s=28, label="points", zorder=2)
    fx = [r.contention_slowdown_median * 100 for r in front]  # type: ignore[operator]
    fy = [r.exposed_comm_fraction_median * 100 for r in front]  # type: ignore[operator]
    ax.step(fx, fy, where="post", color="#e4572e", linewidth=1.5, zorder=3)
    ax.scatter(fx, fy, color="#e4572e", s=40, label="Pareto front", zorder=4)
    for row, x, y in zip(front, fx, fy):
        ax.annotate(row.label + (" (best)" if row.label == winner else ""), (x, y), textcoords="offset points",
                    xytext=(5, 5), fontsize=7, color="#b00020")
    chosen = [r for r in usable if r.label == winner and r not in front]
    for row in chosen:
        ax.annotate(row.label + " (best)", (row.contention_slowdown_median * 100,  # type: ignore[operator]
                                            row.exposed_comm_fraction_median * 100),  # type: ignore[operator]
                    textcoords="offset points", xytext=(5, -10), fontsize=7)
    ax.set_xlabel("GEMM contention slowdown under overlap, median (%)")
    ax.set_ylabel("exposed communication, median (% of the step)")
    ax.set_title("Trade-off: contention vs exposed communication (lower is better)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
