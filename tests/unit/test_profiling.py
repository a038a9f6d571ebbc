"""Profiler wrappers, flag rules and the tool check (the check runs in a real shell)."""
from __future__ import annotations

import subprocess

import pytest

from tasks.lib.profiling import (
    ProfilerChoice,
    ProfilingError,
    check_visible_on_host,
    missing_tools_message,
    parse_tool_check,
    profiler_output_dirs,
    profiler_wrapper_argv,
    required_tools,
    resolve_profilers,
    rocprof_input_node_path,
    tool_check_command,
    torch_profile_overrides,
)

OUT = "/work/main/experiments/multinode_28ch_256th_20250101_000000/256thread_28channels"


def test_rocprof_per_node_command_line():
    choice = resolve_profilers(rocprof=True)
    assert profiler_wrapper_argv(choice, OUT, node_rank=1) == [
        "rocprofv3", "--kernel-trace", "--output-format", "pftrace", "csv",
        "-d", f"{OUT}/rocprof_traces/node_1", "--"]


def test_stats_alone_implies_rocprof_and_adds_stats():
    choice = resolve_profilers(stats=True)
    assert choice.rocprof and choice.stats
    argv = profiler_wrapper_argv(choice, OUT, node_rank=0)
    assert argv[:3] == ["rocprofv3", "--kernel-trace", "--stats"]
    assert argv[-3:] == ["-d", f"{OUT}/rocprof_traces/node_0", "--"]


def test_rocprof_input_replaces_the_trace_flags():
    choice = resolve_profilers(rocprof_input="/w/run/rocprof_input.yaml")
    assert choice.rocprof
    assert profiler_wrapper_argv(choice, OUT, node_rank=3) == [
        "rocprofv3", "-i", "/w/run/rocprof_input.yaml", "-d", f"{OUT}/rocprof_traces/node_3", "--"]


def test_shared_launcher_form_lets_each_profiler_expand_the_node_rank():
    rocprof = profiler_wrapper_argv(resolve_profilers(rocprof=True), OUT)
    assert rocprof[rocprof.index("-d") + 1] == f"{OUT}/rocprof_traces/node_%env{{GEMM_NODE_RANK}}%"
    nsys = profiler_wrapper_argv(resolve_profilers(nsys=True), OUT)
    assert nsys[-1] == f"{OUT}/nsys/node_%q{{GEMM_NODE_RANK}}"


def test_nsys_per_node_command_line():
    argv = profiler_wrapper_argv(resolve_profilers(nsys=True), OUT, node_rank=2)
    assert argv[:2] == ["nsys", "profile"]
    assert argv[-2:] == ["--output", f"{OUT}/nsys/node_2"]
    assert "--" not in argv


def test_no_profiler_no_wrapper():
    assert profiler_wrapper_argv(ProfilerChoice(), OUT, 0) is None
    assert profiler_wrapper_argv(resolve_profilers(torch_profile=True), OUT, 0) is None


@pytest.mark.parametrize("kwargs, fragment", [
    ({"rocprof": True, "nsys": True}, "choose one profiler"),
    ({"stats": True, "nsys": True}, "choose one profiler"),
    ({"rocprof": True, "platform": "cuda"}, "use --nsys"),
    ({"nsys": True, "platform": "rocm"}, "use --rocprof"),
    ({"rocprof_input": "counters.xml"}, "rocprofv3 reads"),
])
def test_bad_combinations_say_how_to_fix(kwargs, fragment):
    with pytest.raises(ProfilingError, match=fragment):
        resolve_profilers(**kwargs)


def test_relative_output_dir_refused():
    with pytest.raises(ProfilingError, match="absolute"):
        profiler_wrapper_argv(resolve_profilers(rocprof=True), "experiments/x", 0)


def test_required_tools_and_dirs():
    assert required_tools(resolve_profilers(stats=True)) == ["rocprofv3"]
    assert required_tools(resolve_profilers(nsys=True, torch_profile=True)) == ["nsys"]
    assert required_tools(resolve_profilers(torch_profile=True)) == []
    assert profiler_output_dirs(resolve_profilers(nsys=True, torch_profile=True), OUT) == [
        f"{OUT}/nsys", f"{OUT}/torch_profiler"]


def test_torch_profile_turns_on_the_train_profiler():
    assert torch_profile_overrides(resolve_profilers(torch_profile=True)) == ["profiling.enabled=true"]
    assert torch_profile_overrides(resolve_profilers()) == []


def test_rocprof_input_keeps_its_suffix_on_the_nodes():
    assert rocprof_input_node_path("/w/experiments/r", "/home/u/my counters.YAML") == \
        "/w/experiments/r/rocprof_input.yaml"


def test_traces_must_stay_inside_the_mounted_workdir():
    check_visible_on_host(f"{OUT}/rocprof_traces/node_0", "/work/main")
    with pytest.raises(ProfilingError, match="outside the workdir"):
        check_visible_on_host("/tmp/rocprof/node_0", "/work/main")
    with pytest.raises(ProfilingError):
        check_visible_on_host("/work/main2/x", "/work/main")


def _run(command: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=True,
                          env=env).stdout


def test_tool_check_finds_present_and_missing_tools_in_a_real_shell(tmp_path):
    # `ls` stands in for a profiler that is installed; the other name exists nowhere.
    out = _run(tool_check_command(["ls", "rocprofv3-not-installed-here"]))
    assert parse_tool_check(out, ["ls", "rocprofv3-not-installed-here"]) == ["rocprofv3-not-installed-here"]


def test_tool_check_sees_path_set_by_the_env_script(tmp_path):
    bindir = tmp_path / "rocm bin"
    bindir.mkdir()
    tool = bindir / "rocprofv3"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    env_script = tmp_path / "env.sh"
    env_script.write_text(f'export PATH="{bindir}:$PATH"\n')
    assert parse_tool_check(_run(tool_check_command(["rocprofv3"])), ["rocprofv3"]) == ["rocprofv3"]
    out = _run(tool_check_command(["rocprofv3"], env_script=str(env_script)))
    assert parse_tool_check(out, ["rocprofv3"]) == []


def test_tool_check_runs_inside_the_container_when_there_is_one():
    command = tool_check_command(["nsys"], container="training-overlap")
    assert command.startswith("docker exec training-overlap bash -c ")


def test_unreported_tool_counts_as_missing():
    assert parse_tool_check("", ["nsys"]) == ["nsys"]


def test_missing_message_names_each_host():
    message = missing_tools_message({"node-b": ["rocprofv3"], "node-c": ["rocprofv3"]}, "training-overlap")
    assert "node-b: rocprofv3 not found (in container training-overlap)" in message
    assert "node-c" in message
    assert "nothing was started" in message.splitlines()[0]
