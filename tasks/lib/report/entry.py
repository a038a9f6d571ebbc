"""The row of a run of the user's own training (`fab launch --entry`): its objective (the metric
it was launched with, else its profiler traces' step time, tasks/lib/objective.py) in the
iter_ms columns, its per-rank values as the step sample the decision's interval resamples, and
NCCL's effective settings read from its debug files."""
from __future__ import annotations

from tasks.lib.report.read import COMPLETED, PointSpec, RunData, error_line_in_logs
from tasks.lib.report.point import (
    RUN_OK_STATES, RUN_OPEN_STATES, VERDICTS, PointRow, _failure_problem, _fill_effective,
    _grid_values, _nodes, _run_id, _world_size,
)
from tasks.lib.report.values import _get, _string


def entry_row(data: RunData, spec: PointSpec | None, sweep_status: str | None) -> PointRow:
    from tasks.lib.objective import (MetricError, effective_from_debug_logs, extract_objective,
                                     parse_metric, rank_error_line)

    channels, threads = _grid_values(data, spec)
    run_status = _string(_get(data.run_json, "status"))
    status = next((v for v in (sweep_status, run_status) if v in VERDICTS), None) or (
        COMPLETED if run_status in RUN_OK_STATES else "running" if run_status in RUN_OPEN_STATES
        else run_status or sweep_status or "unknown")
    row = PointRow(run_id=_run_id(data), run_dir=str(data.run_dir), channels=channels,
                   threads=threads, nodes=_nodes(data), world_size=_world_size(data),
                   status=status, steps=0, problems=list(data.problems))
    if spec is not None:
        row.settings = dict(spec.settings)
        row.config, row.repeat = spec.config, spec.repeat
    if (failure := _failure_problem(data.run_json)):
        row.problems.insert(0, failure)
    culprits = _get(data.run_json, "first_failure", "ranks") or []
    if status != COMPLETED and data.output_dir is not None and len(culprits) == 1 and (
            cause := rank_error_line(data.output_dir, int(culprits[0]))):
        row.problems.append(cause)
    elif status != COMPLETED and (cause := error_line_in_logs(data)):
        row.problems.append(cause)
    if data.output_dir is None:
        return row
    row.output_dir = str(data.output_dir)
    metric_text = _get(data.run_json, "flags", "metric")
    try:
        metric = parse_metric(metric_text) if metric_text else None
    except MetricError as err:
        row.problems.append(str(err))
        return row
    objective = extract_objective(data.output_dir, metric)
    if objective is None:
        row.notes.append("no objective: name one with --metric (trace, json:FIELD or a regex)")
    else:
        row.objective, row.objective_goal = objective.metric.describe(), objective.metric.goal
        row.iter_ms_median, row.iter_ms_p90 = objective.median, objective.p90
        row.steps = max((len(v) for v in objective.per_rank.values()), default=0)
        row.problems += objective.problems
        # The k-th value of every rank is step k: the decision's interval resamples steps.
        row.samples = [(step, value) for values in objective.per_rank.values()
                       for step, value in enumerate(values)]
    # run.json keeps env.sh's variables as env.common (tasks/lib/runrecord.py).
    common_env = _get(data.run_json, "env", "common") or {}
    accelerator = _string(_get(data.run_json, "flags", "accelerator")) or "cuda"
    effective = effective_from_debug_logs(data.output_dir, common_env, accelerator)
    _fill_effective(row, {"effective_settings": effective} if effective else None)
    return row
