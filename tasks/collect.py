"""`fab collect`: a detached run's outputs copied home from every node (tasks/run/collecting.py;
`fab launch` does the same at the end of an attached run)."""
from __future__ import annotations

import posixpath
from pathlib import Path

from invoke import Collection, task
from invoke.exceptions import Exit

from tasks.lib.runrecord import RUN_JSON, RunRecord, write_json_atomic
from tasks.run.collecting import collect_outputs, record_collection, refusal_lines
from tasks.cluster.session import EXIT_USAGE, ClusterSession, load_settings, project_path

EXIT_FAILED = 1


def latest_run_dir(experiments_dir: Path) -> Path | None:
    runs = [p for p in experiments_dir.glob("multinode_*") if (p / RUN_JSON).is_file()]
    return max(runs, key=lambda p: (p / RUN_JSON).stat().st_mtime) if runs else None


@task(iterable=["hosts"], help={
    "run": "run id (a directory under experiments/); default: the latest run",
    "hosts": "hosts of that run, master first; default: the inventory (as for the launch)",
})
def collect(c, run=None, hosts=None):
    """Copy a run's outputs from every node into its run directory on this controller.

    For runs started with --detach or left by Ctrl-C: `fab launch` does this itself when it
    watches a run to its end. Files already here with the same size are skipped.
    """
    experiments_dir = project_path(load_settings(c).cluster.experiments_dir)
    run_dir = experiments_dir / run if run else latest_run_dir(experiments_dir)
    if run_dir is None or not (run_dir / RUN_JSON).is_file():
        raise Exit(f"collect: no run.json for {run or 'any run'} under {experiments_dir} "
                   "(give --run with a directory name from there)", code=EXIT_USAGE)
    try:
        record = RunRecord.from_json((run_dir / RUN_JSON).read_text())
    except ValueError as err:
        raise Exit(f"collect: {run_dir / RUN_JSON}: {err}", code=EXIT_USAGE) from None
    with ClusterSession(c, hosts) as session:
        labels = [node.label for node in session.nodes]
        recorded = [node.host for node in record.nodes]
        if recorded and labels != recorded:
            raise Exit(f"collect: run {record.run_id} ran on {', '.join(recorded)} but the "
                       f"inventory is {', '.join(labels)}; pass --hosts {','.join(recorded)}",
                       code=EXIT_USAGE)
        collected = collect_outputs(session, posixpath.join(record.node_run_dir, record.output_dir),
                                    run_dir / record.output_dir)
    record_collection(record, collected)
    for node, done in sorted(collected.ok.items(), key=lambda item: item[0].index):
        print(f"node {node.index}: {done.files} file(s), {done.bytes} bytes copied, "
              f"{done.skipped} already there")
    write_json_atomic(run_dir / RUN_JSON, record.to_dict())
    refused = refusal_lines(collected)
    not_copied = "\n  ".join(["some outputs were not copied:", *refused]) if refused else ""
    collected.raise_if_failed("collecting outputs", code=EXIT_FAILED,
                              hint="\n".join(filter(None, [
                                  f"the files stay on those hosts; `fab collect --run "
                                  f"{record.run_id}` retries", not_copied])))
    if refused:
        # Everything else was collected: the exit status says the outputs are not all here.
        raise Exit(f"collect: {not_copied}", code=EXIT_FAILED)


ns = Collection(collect)
