"""`fab sweep`'s rank pools (the default): the points that share a thread value run in one
launch, one rank pool.

The sweep machinery is tasks/sweep.py's (sweep.json, leftover checks, watchdog, resume); this
runner only changes what one launch covers. The first pending run of each pool starts the
launch with every point of the pool (train.pool, one communicator per point); the others are
then recorded from their own directories in the shared run directory, with the pool's in-process
timings. A thread or --axis change is a new launch (NCCL reads NCCL_NTHREADS once per process;
axis variables are process environment): tasks/lib/design.py.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from tasks.lib import pool as pool_lib
from tasks.lib import report as rep
from tasks.lib import sweep as sw
from tasks.lib.runrecord import now_iso
from tasks.lib.runspec import load_train_config
from tasks.sweeping.runner import SweepRunner, write_sweep


class PoolSweepRunner(SweepRunner):
    """SweepRunner whose launches each run a whole pool of points."""

    def __init__(self, *args: Any, groups: list[list[int]], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.groups = groups
        self.group_of = {index: group for group in groups for index in group}
        self.recorded: set[int] = set()

    def prepare(self) -> None:
        """Each pool's launch spec, validated by the train package's loader before any point
        starts (RunSpecError: bad flags, exit 2)."""
        points = self.document["points"]
        for group in self.groups:
            leader = group[0]
            spec = self.specs[leader]
            base = pool_lib.base_overrides(spec.overrides, points[leader].get("overrides") or [])
            overrides = base + tuple(pool_lib.pool_overrides(points, group))
            load_train_config(spec.config_path, overrides)
            self.specs[leader] = replace(spec, overrides=overrides)

    def run_point(self, point: dict[str, Any]) -> None:
        index = point["index"]
        if index in self.recorded:
            return  # its pool ran it
        group = self.group_of[index]
        members = [i for i in group if i != index]
        single_limit = self.point_timeout
        if self.point_timeout:
            self.point_timeout = self.point_timeout * len(group)  # the launch runs them all
        try:
            super().run_point(point)
        finally:
            self.point_timeout = single_limit
            point["output_dir"] = pool_lib.point_output_dir(point, point)
            point["pool_points"] = [self.document["points"][i]["channels"] for i in group]
            self.recorded.add(index)
            if point.get("run_dir"):
                for member in members:
                    self.record_member(self.document["points"][member], point)
            write_sweep(self.sweep_dir, self.document)

    def point_names(self, point: Mapping[str, Any]) -> list[str | None]:
        """Every point of the launch's pool, the leader first (the order the pool ran them)."""
        points = self.document["points"]
        return [pool_lib.point_output_dir(points[i], point) for i in self.group_of[point["index"]]]

    def record_member(self, member: dict[str, Any], leader: dict[str, Any]) -> None:
        name = pool_lib.point_output_dir(member, leader)
        run_dir = (self.sweep_dir / leader["run_dir"]).resolve()
        data = self.launch_runs.get(name)  # read by finish_point, unless the launch never got there
        if data is None or data.run_dir != run_dir:
            data = rep.read_run(run_dir, name)
        member.update(
            started_at=leader.get("started_at"), ended_at=now_iso(),
            attempts=member.get("attempts", 0) + 1, run_id=leader.get("run_id"),
            run_dir=leader.get("run_dir"), output_dir=name, exit_status=leader.get("exit_status"),
            launch_s=None, cleanup_wait_s=None, startup_s=None, teardown_s=None, idle_before_s=None,
            error=None, pool_points=leader.get("pool_points"))
        if data.output_dir is None or data.summary is None:
            verdict = leader.get("status") if leader.get("status") in ("hung", sw.INTERRUPTED) else "failed"
            member["status"] = verdict
            member["error"] = leader.get("error") or "the pool did not reach this point"
        else:
            row = rep.summarize_run(data)
            member["status"] = sw.point_status(row.status)
            if member["status"] != sw.COMPLETED:
                member["error"] = "; ".join(row.problems[:2]) or f"run {row.status}"
        member.update(pool_lib.pool_point_record(data.summary))
        member.update(sw.work_record(data.summary))
        self.recorded.add(member["index"])
        self.console.out(f"sweep: point {member['index'] + 1} {sw.run_label(member, self.document)} "
                         f"(in the pool of point {leader['index'] + 1}): "
                         f"{member['status']}" + (f" ({member['error']})" if member.get("error") else ""),
                         highlight=False)


def order_and_group(document: dict[str, Any], pending: list[int]) -> tuple[list[int], list[list[int]]]:
    """The pending runs in their order and cut into pools (the order already keeps a pool's runs
    together; tasks/lib/design.py)."""
    groups = pool_lib.pool_groups(document["points"], pending)
    return [i for group in groups for i in group], groups

