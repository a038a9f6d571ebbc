"""`fab launch`: validate, probe, render, push, start, watch, fail fast, collect, summarise.

The task resolves its flags (tasks/lib/runspec.py decides every value) and hands the run to
tasks/run/lifecycle.py, which `fab sweep` and `fab tune` share. Order matters: every flag and file
is checked before any host is contacted, and every host is probed (one round trip each, in
parallel) before anything is written to one.

Exit status: 0 the run succeeded; 1 it failed or was stopped (run.json says which node failed
first) or a host could not be reached; 2 bad flags, config or cluster state (nothing started);
3 refused: a run is already active on one of the hosts (--force launches anyway); 4 the run hung
(no rank advanced for --hang-timeout seconds: diagnostics in <run dir>/hang/, then stopped);
130 Ctrl-C detached the controller (the run goes on: `fab logs --follow`, `fab stop`).
"""
from __future__ import annotations

import os
import posixpath
from time import monotonic  # launch() has a --time flag
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from invoke import Collection, Task, task
from invoke.exceptions import Exit
from rich.console import Console

from tasks.lib.console import make_console
from tasks.lib.profiling import profiler_wrapper_argv
from tasks.lib.quoting import sh_join
from tasks.lib.runspec import LaunchFlags, RunSpec
from tasks.cluster.session import EXIT_USAGE, ClusterSession, project_path
from tasks.run.lifecycle import entry_line, run_launch
from tasks.run.plan import (
    ENV_SCRIPT,
    NODE_LAUNCHER,
    abbreviate_script,
    build_plan,
    bundle_for,
    launcher_start,
    pick_run_id,
    resolve_spec,
)
from tasks.run.submit import submit_and_follow
from tasks.run.watch import node_log_path, tail_command

SHORT_FLAGS = {"channels": "c", "threads": "t", "nproc": "p", "config": "C", "rocprof": "r",
               "stats": "m"}


class LaunchTask(Task):
    """A Task whose short flags are chosen, not derived: -c/-t/-p/-r/-m as in the scripts we
    replace, -C for --config (-f is fab's own --config, so the original's -f would confuse)."""

    def __init__(self, *args: Any, short_flags: Mapping[str, str] | None = None, **kwargs: Any):
        self.short_flags = dict(short_flags or {})
        kwargs["auto_shortflags"] = False
        super().__init__(*args, **kwargs)

    def arg_opts(self, name: str, default: str, taken_names: set[str]) -> dict[str, Any]:
        opts = super().arg_opts(name, default, taken_names)
        short = self.short_flags.get(name)
        if short and short not in taken_names:
            opts["names"] = [*opts["names"], short]
        return opts


# -- dry run ---------------------------------------------------------------------------------------

def print_dry_run(session: ClusterSession, spec: RunSpec, console: Console) -> None:
    """Print what would be pushed and run on each host, contacting none of them."""
    settings = session.settings
    experiments_dir = project_path(settings.cluster.experiments_dir)
    run_id = pick_run_id(spec, experiments_dir, datetime.now(), create=False)
    master = session.inventory.master
    master_addr = "127.0.0.1" if master.local else master.host
    socket_ifname = settings.cluster.socket_ifname
    ifnames = [socket_ifname or ("lo" if node.is_local else "<route to master>")
               for node in session.nodes]
    nproc = spec.nproc if spec.nproc != "auto" else "<GPUs per node>"
    port = spec.master_port or "<free port>"
    plan = build_plan(session, spec, run_id=run_id, run_dir=experiments_dir / run_id, nproc=nproc,
                      master_addr=master_addr, master_port=port, ifnames=ifnames, facts=None)
    out = console.out
    out(entry_line(spec))
    out(f"dry run of {run_id}: no host contacted, nothing written.")
    out("assumed (the probe decides at launch time):")
    out(f"  master address: {master_addr} (node 0's address on its interface toward the workers)")
    out(f"  socket interface per host: {socket_ifname or 'the one routing to the master'}")
    out(f"  ranks per node: {nproc}; master port: {port}; accelerator: {spec.accelerator}; "
        f"docker: {'on' if spec.docker else 'off'}")
    registry = settings.cluster.registry_dir or "/tmp/gemm-runs-<uid> of the user on each host"
    out(f"  run registry: {registry}")
    out(f"transport: {session.transport.describe()}")
    for warning in spec.warnings:
        out(f"warning: {warning}")
    out(f"controller run dir: {plan.run_dir}")
    for node in session.nodes:
        where = ", this machine, no SSH" if node.is_local else ""
        out(f"\nnode {node.index} ({node.label}{where}):")
        out(f"  push to {plan.node_run_dir}/:")
        for path, content in sorted(bundle_for(plan).items()):
            out(f"    {posixpath.relpath(path, plan.node_run_dir)} ({len(content)} bytes)")
        out(f"    {NODE_LAUNCHER} ({len(plan.launcher)} bytes)")
        out("  run:")
        out("    probe: sh -c <tasks/lib/probe.py probe_script> (GPUs, interface, checkout)")
        start = session.transport.start_command(launcher_start(session, plan), node)
        out(f"    start: {abbreviate_script(start)}")
        out(f"    watch: {tail_command(node_log_path(plan, node.index), '<launcher pid>')}")
        wrapper = profiler_wrapper_argv(plan.profilers, plan.output_dir, node_rank=node.index)
        argv = [*(wrapper or []), plan.torchrun[0], f"--node-rank={node.index}", *plan.torchrun[1:]]
        out(f"    ranks: {sh_join(argv)}")
    out(f"\n{ENV_SCRIPT}:")  # secret-looking values as *** (GEMM_MASKED_VARS names them)
    out(plan.shown(ENV_SCRIPT).rstrip("\n"))


# -- the task --------------------------------------------------------------------------------------

@task(
    klass=LaunchTask,
    short_flags=SHORT_FLAGS,
    iterable=["override", "env", "hosts"],
    help={
        "channels": "NCCL channels, 1-64: NCCL_MIN/MAX_NCHANNELS (and NCCL_MIN/MAX_CTAS on CUDA). "
                    "Default: launch.channels, $CHANNELS, 28",
        "threads": "threads per block, 64/128/256/512: RCCL_THREADS_PER_BLOCK and NCCL_NTHREADS. "
                   "Default: launch.threads, $THREADS, 256",
        "nproc": "ranks per node, or 'auto' = the GPUs of each node. Default: launch.nproc, "
                 "$NPROC_PER_NODE, 8 (2 on CPU nodes)",
        "config": "train config YAML, validated before any host is contacted. Default: "
                  "launch.config, $CONFIG_FILE, config/multi_node/distributed_multinode.yaml "
                  "(cpu_tiny.yaml on CPU nodes)",
        "rocprof": "wrap torchrun in rocprofv3 (kernel trace into rocprof_traces/node_<rank>/)",
        "stats": "rocprofv3 kernel statistics (implies --rocprof)",
        "rocprof_input": "rocprofv3 input file (yaml/json; implies --rocprof), pushed with the run",
        "nsys": "wrap torchrun in Nsight Systems (CUDA nodes; reports into nsys/node_<rank>)",
        "torch_profile": "turn on the train package's torch profiler (traces in torch_profiler/)",
        "hang_timeout": "seconds without progress of any rank before diagnostics and a stop "
                        "(default: launch.hang_timeout if set, else 0.8 x distributed.timeout_s, "
                        "at most 600, tightened to 10 x the slowest step once steps arrive; 0: off)",
        "master_port": "rendezvous port on node 0, checked free there; 'auto' (default) picks one",
        "nccl_preset": "NCCL settings from config/nccl/<name>.yaml: ib, ethernet, debug",
        "override": "train config override section.key=value (repeatable), "
                    "e.g. training.max_steps=50",
        "env": "extra variable KEY=VALUE for every rank (repeatable); the value arrives "
               "literally. KEY alone takes KEY's value from this environment (keeps a secret "
               "out of the command line, which ps shows to every user)",
        "docker": "run the ranks in the experiment container (fab docker-up) on every node",
        "no_docker": "run the ranks bare on every node (activating cluster.venv)",
        "detach": "return right after the start, printing the run id (fab logs/status/stop)",
        "dry_run": "print, per host, the files it would push and the commands; contact no host",
        "force": "launch even while another run is active on one of the hosts",
        "pin_channels": "pin channels (min = max); --no-pin-channels sets only the maxima",
        "hosts": "hosts for this run, master first (comma-separated or repeated); "
                 "default: the inventory",
        "slurm": "outside an allocation: submit this launch as a Slurm batch job (sbatch), print "
                 "its id and follow it (Ctrl-C stops following); inside, it runs as an srun step",
        "partition": "with --slurm: the partition (sbatch --partition)",
        "time": "with --slurm: the time limit (sbatch --time, e.g. 30 or 1:00:00)",
        "account": "with --slurm: the account to charge (sbatch --account)",
        "nodes": "with --slurm: nodes to allocate (default: the inventory's host count)",
        "entry": "run your own training instead of the GEMM experiment: what you would type "
                 "after torchrun, quoted as one value: --entry \"train.py --config my.yaml\" "
                 "or --entry \"-m pkg.train --lr 3e-4\" (default: launch.entry). A script "
                 "outside this checkout is pushed with its directory; the ranks start there",
        "metric": "the objective of an --entry run for reports and sweeps: trace (step time of "
                  "its PyTorch profiler traces), json:FIELD or a regex with one group in its "
                  "ranks' output lines; max: first when higher is better (default: launch.metric)",
    },
)
def launch(c, channels=None, threads=None, nproc=None, config=None, rocprof=False, stats=False,
           rocprof_input=None, nsys=False, torch_profile=False, master_port=None,
           nccl_preset=None, override=None, env=None, docker=False, no_docker=False,
           detach=False, dry_run=False, force=False, pin_channels=True, hang_timeout=None,
           hosts=None, slurm=False, partition=None, time=None, account=None, nodes=None,
           entry=None, metric=None):
    """Run the GEMM training on every node: validate, probe, push, start, watch, collect.

    With no inventory this machine alone runs it, without SSH (GPU if present, else 2 CPU ranks
    with gloo and config/multi_node/cpu_tiny.yaml). Ctrl-C detaches; the run goes on.
    """
    if docker and no_docker:
        raise Exit("launch: --docker and --no-docker contradict each other; give one",
                   code=EXIT_USAGE)
    console = make_console(soft_wrap=True)
    flags = LaunchFlags(
        channels=channels, threads=threads, nproc=nproc, config=config, master_port=master_port,
        nccl_preset=nccl_preset, overrides=tuple(override or ()), env=tuple(env or ()),
        docker=True if docker else (False if no_docker else None), rocprof=rocprof, stats=stats,
        rocprof_input=rocprof_input, nsys=nsys, torch_profile=torch_profile,
        hang_timeout=hang_timeout, pin_channels=pin_channels, detach=detach, dry_run=dry_run,
        force=force, entry=entry, metric=metric)
    started = monotonic()
    if not slurm and any(v is not None for v in (partition, time, account, nodes)):
        raise Exit("launch: --partition, --time, --account and --nodes go with --slurm",
                   code=EXIT_USAGE)
    with ClusterSession(c, hosts) as session:  # no host is contacted until the probe
        spec = resolve_spec(session, flags, c.config, os.environ)
        if slurm:  # validated above, like any launch; the batch job runs it
            code = submit_and_follow(
                nodes=nodes, partition=partition, time_limit=time, account=account,
                default_nodes=0 if session.inventory.is_local else len(session.nodes),
                experiments_dir=project_path(session.settings.cluster.experiments_dir),
                dry_run=spec.dry_run, console=console,
                secret_patterns=session.settings.launch.secret_env_patterns)
            if code:
                raise Exit(code=code)
            return
        if spec.dry_run:
            print_dry_run(session, spec, console)
            return
        code = run_launch(session, spec, console, started=started)
    if code:
        raise Exit(code=code)


ns = Collection(launch)
