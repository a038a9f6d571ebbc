"""Profiler wrappers around each node's torchrun, and the check that the profilers exist.

Pure: builds argv lists and check commands, parses their output. The traces go under the run's
output directory, which lies inside the workdir that the container mounts at the same path, so
the host (and the collect step) sees exactly what the profiler wrote inside the container.
"""
from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tasks.lib.quoting import sh_quote

ROCPROF_TOOL = "rocprofv3"
NSYS_TOOL = "nsys"
ROCPROF_TRACE_DIR = "rocprof_traces"
NSYS_REPORT_DIR = "nsys"
TORCH_PROFILER_DIR = "torch_profiler"
# rocprofv3 picks the input format from the extension; the text format only lists counters.
ROCPROF_INPUT_SUFFIXES = (".yaml", ".yml", ".json", ".txt")
# nsys follows torchrun's children; osrt shows the blocking calls around collectives.
NSYS_TRACE = "cuda,nvtx,osrt"


class ProfilingError(ValueError):
    """A profiling flag combination or path that cannot work; the message says how to fix it."""


@dataclass(frozen=True)
class ProfilerChoice:
    """Which profilers a run uses, after the implications between flags are applied."""

    rocprof: bool = False
    stats: bool = False
    rocprof_input: str | None = None  # the path on the nodes (pushed with the bundle)
    nsys: bool = False
    torch_profile: bool = False

    @property
    def wraps_torchrun(self) -> bool:
        return self.rocprof or self.nsys

    def as_dict(self) -> dict[str, object]:
        """For run.json."""
        return {"rocprof": self.rocprof, "stats": self.stats, "rocprof_input": self.rocprof_input,
                "nsys": self.nsys, "torch_profile": self.torch_profile}


def resolve_profilers(
    *,
    rocprof: bool = False,
    stats: bool = False,
    rocprof_input: str | None = None,
    nsys: bool = False,
    torch_profile: bool = False,
    platform: str | None = None,
) -> ProfilerChoice:
    """Apply the flag rules: --stats and --rocprof-input imply --rocprof; rocprof and nsys exclude
    each other (one wrapper per torchrun); each vendor profiler only on its platform.

    `platform` is docker.platform (rocm | cuda | cpu) or None when unknown (bare runs): then the
    tool check on every host decides.
    """
    rocprof = rocprof or stats or bool(rocprof_input)
    if rocprof_input is not None:
        suffix = posixpath.splitext(rocprof_input)[1].lower()
        if suffix not in ROCPROF_INPUT_SUFFIXES:
            raise ProfilingError(f"--rocprof-input {rocprof_input!r}: rocprofv3 reads "
                                 f"{', '.join(ROCPROF_INPUT_SUFFIXES)} files; rename or convert it")
    if rocprof and nsys:
        raise ProfilingError("--rocprof (or --stats/--rocprof-input) and --nsys both wrap torchrun: "
                             "choose one profiler per run")
    if rocprof and platform == "cuda":
        raise ProfilingError("--rocprof needs ROCm nodes but docker.platform is cuda: use --nsys")
    if nsys and platform == "rocm":
        raise ProfilingError("--nsys needs NVIDIA nodes but docker.platform is rocm: use --rocprof")
    return ProfilerChoice(rocprof=rocprof, stats=stats, rocprof_input=rocprof_input, nsys=nsys,
                          torch_profile=torch_profile)


# The node launcher is one file for every node, so the wrapper argv is too: each profiler expands
# its own placeholder for the node rank from the environment the launcher exports (in the
# container too). The dry run shows the per-node expansion.
NODE_RANK_ENV = "GEMM_NODE_RANK"
ROCPROF_NODE_PLACEHOLDER = "%env{" + NODE_RANK_ENV + "}%"
NSYS_NODE_PLACEHOLDER = "%q{" + NODE_RANK_ENV + "}"
# pftrace opens in Perfetto; csv carries --stats' tables (the default rocpd needs a conversion).
ROCPROF_OUTPUT_FORMATS = ("pftrace", "csv")


def rocprof_trace_dir(output_dir: str, node_rank: int | None = None) -> str:
    """`<output_dir>/rocprof_traces/node_<rank>`, with rocprofv3's placeholder when rank is None."""
    name = ROCPROF_NODE_PLACEHOLDER if node_rank is None else str(node_rank)
    return posixpath.join(output_dir, ROCPROF_TRACE_DIR, f"node_{name}")


def nsys_report_base(output_dir: str, node_rank: int | None = None) -> str:
    """nsys appends .nsys-rep to this; nsys' own placeholder when rank is None."""
    name = NSYS_NODE_PLACEHOLDER if node_rank is None else str(node_rank)
    return posixpath.join(output_dir, NSYS_REPORT_DIR, f"node_{name}")


def profiler_wrapper_argv(choice: ProfilerChoice, output_dir: str,
                          node_rank: int | None = None) -> list[str] | None:
    """The argv to put in front of torchrun's, or None when nothing wraps it.

    `output_dir` is the run's output directory on the nodes (absolute, inside the workdir).
    node_rank None: the form for the shared node launcher (the profiler expands the rank);
    an int: what that node runs, for --dry-run.
    """
    if not posixpath.isabs(output_dir):
        raise ProfilingError(f"profiler output dir must be absolute, got {output_dir!r}")
    if choice.rocprof:
        argv = [ROCPROF_TOOL]
        if choice.rocprof_input:
            argv += ["-i", choice.rocprof_input]
        else:
            argv.append("--kernel-trace")
            if choice.stats:
                argv.append("--stats")
            argv += ["--output-format", *ROCPROF_OUTPUT_FORMATS]
        return argv + ["-d", rocprof_trace_dir(output_dir, node_rank), "--"]
    if choice.nsys:
        # nsys takes the application as its first non-option argument (no "--").
        return [NSYS_TOOL, "profile", f"--trace={NSYS_TRACE}", "--force-overwrite=true",
                "--output", nsys_report_base(output_dir, node_rank)]
    return None


def profiler_output_dirs(choice: ProfilerChoice, output_dir: str) -> list[str]:
    """Directories to create on every node before start (nsys does not create its report's
    parent; rocprofv3 creates the per-node one itself)."""
    dirs = []
    if choice.rocprof:
        dirs.append(posixpath.join(output_dir, ROCPROF_TRACE_DIR))
    if choice.nsys:
        dirs.append(posixpath.join(output_dir, NSYS_REPORT_DIR))
    if choice.torch_profile:
        dirs.append(posixpath.join(output_dir, TORCH_PROFILER_DIR))
    return dirs


def torch_profile_overrides(choice: ProfilerChoice) -> list[str]:
    """`--override` values for the train package (its profiler writes <output_dir>/torch_profiler/)."""
    return ["profiling.enabled=true"] if choice.torch_profile else []


def rocprof_input_node_path(run_dir: str, local_input: str) -> str:
    """Where the bundle puts the --rocprof-input file on every node (keeps the suffix rocprofv3 reads)."""
    suffix = posixpath.splitext(local_input)[1].lower()
    return posixpath.join(run_dir, f"rocprof_input{suffix}")


def required_tools(choice: ProfilerChoice) -> list[str]:
    tools = []
    if choice.rocprof:
        tools.append(ROCPROF_TOOL)
    if choice.nsys:
        tools.append(NSYS_TOOL)
    return tools


def check_visible_on_host(trace_dir: str, workdir: str) -> None:
    """Refuse a trace dir outside the mounted workdir: the container would write where the host
    never looks (what lost the traces in the scripts we replace)."""
    norm_trace = posixpath.normpath(trace_dir)
    norm_work = posixpath.normpath(workdir)
    if norm_trace != norm_work and not norm_trace.startswith(norm_work.rstrip("/") + "/"):
        raise ProfilingError(f"trace directory {trace_dir} is outside the workdir {workdir} that the "
                             "container mounts: the host would not see the traces")


def tool_check_command(tools: Sequence[str], container: str | None = None,
                       env_script: str | None = None) -> str:
    """Shell command printing `<tool>\\t<path or MISSING>` per tool, where torchrun will run:
    inside the container when there is one, after sourcing the run's env script when given (it may
    extend PATH, e.g. /opt/rocm/bin). Exits 0 either way: the parse decides."""
    probe = "; ".join(
        f"printf '%s\\t%s\\n' {sh_quote(tool)} \"$(command -v {sh_quote(tool)} || echo MISSING)\""
        for tool in tools
    ) or "true"
    if env_script:
        probe = f"{{ [ -f {sh_quote(env_script)} ] && . {sh_quote(env_script)} >/dev/null 2>&1; }}; {probe}"
    # /opt/rocm/bin is where ROCm installs rocprofv3 but is not always on a non-login PATH.
    probe = f'PATH="$PATH:/opt/rocm/bin:/usr/local/cuda/bin"; {probe}'
    if container:
        return f"docker exec {sh_quote(container)} bash -c {sh_quote(probe)}"
    return f"bash -c {sh_quote(probe)}"


def parse_tool_check(text: str, tools: Sequence[str]) -> list[str]:
    """The tools the check reported missing (or did not report at all)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, path = line.partition("\t")
        if sep:
            found[name.strip()] = path.strip()
    return [tool for tool in tools if found.get(tool, "MISSING") in ("", "MISSING")]


def missing_tools_message(missing_by_host: Mapping[str, Sequence[str]],
                          container: str | None = None) -> str:
    """One line per host lacking a profiler, for the pre-start failure."""
    where = f" (in container {container})" if container else ""
    lines = [f"profiler missing on {len(missing_by_host)} host(s); nothing was started:"]
    for host, tools in missing_by_host.items():
        lines.append(f"  {host}: {', '.join(tools)} not found{where}")
    lines.append("install it on every node (rocprofv3 ships with ROCm, nsys with Nsight Systems) "
                 "or launch without the profiling flag")
    return "\n".join(lines)
