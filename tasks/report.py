"""`fab report PATH`: results.csv, report.md and figures for a run or a sweep directory."""
from __future__ import annotations

import re

from invoke import Collection, task
from invoke.exceptions import Exit

from tasks.lib import report as rep
from tasks.lib.console import make_console
from tasks.lib.report.cli import parse_margin, print_report, write_exports
from tasks.lib.report.outputs import write_report
from tasks.cluster.session import EXIT_USAGE, cli_path


@task(help={
    "path": "run directory (experiments/multinode_...), sweep directory (experiments/sweep_...) "
            "or a directory of run directories",
    "out": "write results.csv, report.md and the PNGs here instead of into PATH",
    "no_plots": "skip the PNG figures",
    "min_margin": "percent the runner-up must be slower, beyond the noise, for a point to be named "
                  "best (default 1)",
    "export": "write the best point's settings to FILE as `export NAME=value` lines a job can source "
              "(refused without a single best point unless --pick names one)",
    "export_preset": "write the best point's settings as config/nccl/NAME.yaml, for fab launch "
                     "--nccl-preset NAME (its channels and threads included)",
    "pick": "the point to export where no single one is best: CxT[,NAME=VALUE...], e.g. --pick 4x256",
    "comm_kernels": "trace analysis: regex of the kernels that are communication (default: "
                    "NCCL's and RCCL's, (?i)nccl|rccl), e.g. a copy kernel at world size 1",
    "compute_kernels": "trace analysis: regex of the kernels that are compute (default: every "
                       "kernel that is not communication)",
})
def report(c, path, out=None, no_plots=False, min_margin=None, export=None, export_preset=None, pick=None,
           comm_kernels=None, compute_kernels=None):
    """Summarise a run or a sweep: results.csv, report.md (the decision, trade-off, the trace
    analysis of any PyTorch profiler traces), PNG figures; --export the chosen point."""
    target = cli_path(path)
    for flag, pattern in (("--comm-kernels", comm_kernels), ("--compute-kernels", compute_kernels)):
        if pattern:
            try:
                re.compile(pattern)
            except re.error as err:
                raise Exit(f"report: {flag} {pattern!r}: not a regular expression ({err})",
                           code=EXIT_USAGE) from None
    try:
        result = write_report(target, cli_path(out) if out else None, plots=not no_plots,
                              min_margin=parse_margin(min_margin), comm_pattern=comm_kernels,
                              compute_pattern=compute_kernels)
    except rep.ReportError as err:
        raise Exit(f"report: {err}", code=EXIT_USAGE) from None
    except OSError as err:
        raise Exit(f"report: cannot write into {out or target}: {err.strerror or err}; "
                   "choose another directory with --out", code=1) from None
    console = make_console()
    print_report(console, result)
    if export or export_preset or pick:
        write_exports(console, result, cli_path(export) if export else None, export_preset, pick)


ns = Collection(report)
