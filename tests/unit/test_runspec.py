"""tasks/lib/runspec.py: resolution order, validation, env mapping, naming, argv building."""
from __future__ import annotations

import re
import subprocess
import sys
from datetime import datetime
from itertools import islice
from pathlib import Path

import pytest

from tasks.lib.runspec import (
    BUILTINS,
    CPU_BUILTINS,
    LaunchFlags,
    RunSpecError,
    nccl_env,
    node_run_dir,
    output_dir_name,
    parse_channels,
    parse_env_pairs,
    parse_master_port,
    parse_nproc,
    parse_overrides,
    parse_threads,
    resolve_nproc,
    parse_hang_timeout,
    resolve_launch_values,
    resolve_run_spec,
    run_id_base,
    run_id_candidates,
    socket_env,
    thread_warnings,
    torchrun_argv,
)
from tests.helpers import assert_imports_none_of

ROOT = Path(__file__).resolve().parents[2]
CPU_CONFIG = "config/multi_node/cpu_tiny.yaml"


def resolve(flags: LaunchFlags = LaunchFlags(), config: dict | None = None,
            environ: dict | None = None, accelerator: str = "rocm", **kwargs):
    kwargs.setdefault("validate_config", lambda path, overrides: None)
    return resolve_run_spec(flags, config or {}, environ or {}, accelerator=accelerator,
                            docker_default=kwargs.pop("docker_default", True), project_root=ROOT,
                            **kwargs)


# -- resolution order ------------------------------------------------------------------------------

def test_flag_beats_config_beats_env_beats_builtin():
    environ = {"CHANNELS": "42", "THREADS": "128", "NPROC_PER_NODE": "4", "MASTER_PORT": "29600"}
    spec = resolve(LaunchFlags(channels="56"), {"threads": 512}, environ)
    assert spec.channels == 56 and spec.sources["channels"] == "flag"
    assert spec.threads == 512 and spec.sources["threads"] == "config"
    assert spec.nproc == 4 and spec.sources["nproc"] == "env NPROC_PER_NODE"
    assert spec.master_port == 29600 and spec.sources["master_port"] == "env MASTER_PORT"
    assert spec.config == BUILTINS["config"] and spec.sources["config"] == "built-in"


def test_builtins_without_anything():
    spec = resolve()
    assert (spec.channels, spec.threads, spec.nproc, spec.master_port) == (28, 256, 8, None)
    assert spec.docker is True and spec.pin_channels


def test_cpu_nodes_get_the_cpu_builtins_but_explicit_values_win():
    spec = resolve(accelerator="cpu")
    assert spec.nproc == CPU_BUILTINS["nproc"] == 2
    assert spec.config == CPU_BUILTINS["config"]
    spec = resolve(LaunchFlags(nproc="3"), {"config": CPU_CONFIG}, accelerator="cpu")
    assert spec.nproc == 3 and spec.sources["config"] == "config"


def test_builtin_overrides_rank_below_everything_else():
    spec = resolve(builtin_overrides={"nproc": "auto"})
    assert spec.nproc == "auto" and spec.sources["nproc"] == "built-in"
    assert resolve(LaunchFlags(nproc="2"), builtin_overrides={"nproc": "auto"}).nproc == 2
    assert resolve(environ={"NPROC_PER_NODE": "3"}, builtin_overrides={"nproc": "auto"}).nproc == 3


def test_config_file_env_var_and_empty_env_values():
    spec = resolve(environ={"CONFIG_FILE": CPU_CONFIG, "CHANNELS": "  "})
    assert spec.config == CPU_CONFIG and spec.sources["config"] == "env CONFIG_FILE"
    assert spec.channels == 28  # an empty variable is no value


def test_bad_env_value_is_named_by_its_variable():
    with pytest.raises(RunSpecError, match="CHANNELS: 'lots' is not an integer"):
        resolve(environ={"CHANNELS": "lots"})
    with pytest.raises(RunSpecError, match=r"launch\.threads: 300"):
        resolve(config={"threads": 300})


def test_docker_flag_over_default():
    assert resolve(LaunchFlags(docker=False)).docker is False
    assert resolve(LaunchFlags(docker=True), docker_default=False).docker is True
    assert resolve(docker_default=False).docker is False


# -- single values ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["1", 64, "+28", 28])
def test_channels_in_range(value):
    assert 1 <= parse_channels(value) <= 64


@pytest.mark.parametrize("value,message", [
    ("0", "outside 1-64"), ("65", "outside 1-64"), ("2.5", "not an integer"),
    ("", "not an integer"), (True, "not an integer"), ("abc", "not an integer"),
])
def test_channels_rejected(value, message):
    with pytest.raises(RunSpecError, match=message):
        parse_channels(value)


@pytest.mark.parametrize("value", [64, 128, 256, 512, "256"])
def test_threads_accepted(value):
    assert parse_threads(value) == int(value)


def test_threads_rejected_with_what_rccl_would_do():
    with pytest.raises(RunSpecError, match=r"RCCL would run 256 .*multiple of 64"):
        parse_threads(300)
    with pytest.raises(RunSpecError, match=r"RCCL would run 512"):
        parse_threads(1024)
    with pytest.raises(RunSpecError, match="one of 64, 128, 256, 512"):
        parse_threads(384)  # RCCL takes it where the arch allows, NCCL_NTHREADS does not


def test_rccl_clamp_is_announced_on_rocm_only():
    assert thread_warnings(512, "rocm") and "256" in thread_warnings(512, "rocm")[0]
    assert thread_warnings(256, "rocm") == []
    assert thread_warnings(512, "cuda") == []
    assert resolve(LaunchFlags(threads="512")).warnings


def test_nproc():
    assert parse_nproc("auto") == "auto" and parse_nproc("AUTO") == "auto"
    assert parse_nproc("4") == 4
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(RunSpecError):
            parse_nproc(bad)
    with pytest.raises(RunSpecError, match="counts GPUs"):
        resolve(LaunchFlags(nproc="auto"), accelerator="cpu")


def test_master_port():
    assert parse_master_port("auto") is None and parse_master_port(None) is None
    assert parse_master_port("29500") == 29500
    for bad in ("80", "70000", "x"):
        with pytest.raises(RunSpecError):
            parse_master_port(bad)


def test_env_pairs_keep_hostile_values_literally():
    hostile = ["A=$(touch /tmp/x)", "B=it's \"quoted\"", "C=two  spaces ", "D=line1\nline2", "E=",
               "F=a=b"]
    assert dict(parse_env_pairs(hostile)) == {
        "A": "$(touch /tmp/x)", "B": "it's \"quoted\"", "C": "two  spaces ", "D": "line1\nline2",
        "E": "", "F": "a=b"}


@pytest.mark.parametrize("item,message", [
    ("NOVALUE", "not KEY=VALUE"), ("1X=1", "not a valid variable name"),
    ("A-B=1", "not a valid variable name"), ("NCCL_MAX_NCHANNELS=4", "use --channels"),
    ("MASTER_ADDR=x", "the inventory"), ("GEMM_RUN_ID=x", "set by the launch"),
])
def test_env_pairs_rejected(item, message):
    with pytest.raises(RunSpecError, match=message):
        parse_env_pairs([item])


def test_env_pair_given_twice():
    with pytest.raises(RunSpecError, match="given twice"):
        parse_env_pairs(["X=1", "X=2"])


def test_overrides_syntax():
    assert parse_overrides(["training.max_steps=3 model.layers=2", "comm.overlap=false"]) == (
        "training.max_steps=3", "model.layers=2", "comm.overlap=false")
    for bad in ("max_steps=3", "training.max_steps", "=1"):
        with pytest.raises(RunSpecError, match="section.key=value"):
            parse_overrides([bad])
    with pytest.raises(RunSpecError, match="set by the launch"):
        parse_overrides(["training.output_dir=/tmp/x"])


# -- config validation with the train package ------------------------------------------------------

def test_config_validated_by_the_train_package(tmp_path):
    spec = resolve_run_spec(LaunchFlags(config=CPU_CONFIG, overrides=("training.max_steps=3",)),
                            {}, {}, accelerator="cpu", docker_default=False, project_root=ROOT)
    assert spec.config_path == ROOT / CPU_CONFIG
    with pytest.raises(RunSpecError, match="not found"):
        resolve_run_spec(LaunchFlags(config=str(tmp_path / "none.yaml")), {}, {}, accelerator="cpu",
                         docker_default=False, project_root=ROOT)
    with pytest.raises(RunSpecError, match="training.max_steps must be >= 1"):
        resolve_run_spec(LaunchFlags(config=CPU_CONFIG, overrides=("training.max_steps=0",)),
                         {}, {}, accelerator="cpu", docker_default=False, project_root=ROOT)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  layerz: 3\n")
    with pytest.raises(RunSpecError, match="unknown key 'model.layerz'"):
        resolve_run_spec(LaunchFlags(config=str(bad)), {}, {}, accelerator="cpu",
                         docker_default=False, project_root=ROOT)


def test_validation_imports_no_torch():
    """The controller never imports torch, even to validate a train config."""
    assert_imports_none_of(("torch",), (
        "from pathlib import Path\n"
        "from tasks.lib.runspec import LaunchFlags, resolve_run_spec\n"
        "import tasks.launch\n"
        f"resolve_run_spec(LaunchFlags(config={CPU_CONFIG!r}), {{}}, {{}}, accelerator='cpu',"
        " docker_default=False, project_root=Path('.'))"))


def test_fab_list_path_imports_neither_torch_nor_matplotlib():
    """`fab --list` imports the fabfile and every task module: keep the heavy libraries off it."""
    assert_imports_none_of(("torch", "matplotlib"), (
        "import fabfile\n"
        "assert len(fabfile.ns.task_names) >= 12, fabfile.ns.task_names"))


# -- profiling flags -------------------------------------------------------------------------------

def test_profiler_rules(tmp_path):
    spec = resolve(LaunchFlags(stats=True))
    assert spec.rocprof and spec.profilers.stats  # --stats implies --rocprof
    assert spec.flags_record()["rocprof"] is True
    with pytest.raises(RunSpecError, match="CPU-only"):
        resolve(LaunchFlags(rocprof=True), accelerator="cpu")
    with pytest.raises(RunSpecError, match="CPU-only"):
        resolve(LaunchFlags(nsys=True), accelerator="cpu")
    with pytest.raises(RunSpecError, match="choose one profiler"):
        resolve(LaunchFlags(rocprof=True, nsys=True), accelerator="rocm")
    with pytest.raises(RunSpecError, match="no such file"):
        resolve(LaunchFlags(rocprof=True, rocprof_input=str(tmp_path / "in.yaml")))
    (tmp_path / "in.yaml").write_text("jobs: []\n")
    spec = resolve(LaunchFlags(rocprof_input=str(tmp_path / "in.yaml")))
    assert spec.rocprof and spec.rocprof_input == tmp_path / "in.yaml"


def test_torch_profile_adds_its_override_and_is_validated_with_it():
    spec = resolve(LaunchFlags(torch_profile=True, overrides=("training.max_steps=6",)),
                   accelerator="cpu")
    assert spec.train_overrides == ("training.max_steps=6", "profiling.enabled=true")
    with pytest.raises(RunSpecError, match="no trace would be written"):
        resolve_run_spec(LaunchFlags(config=CPU_CONFIG, torch_profile=True,
                                     overrides=("training.max_steps=2",)), {}, {},
                         accelerator="cpu", docker_default=False, project_root=ROOT)


def test_hang_timeout():
    # The default config's distributed.timeout_s is 300: the built-in 600 s comes down to 0.8 x
    # 300, so the hang watchdog takes its stacks before the NCCL watchdog aborts.
    default = resolve()
    assert (default.hang_timeout, default.hang_auto) == (240.0, True)
    short = resolve(LaunchFlags(overrides=("distributed.timeout_s=1000",)))
    assert (short.hang_timeout, short.hang_auto) == (600.0, True)
    assert resolve(LaunchFlags(hang_timeout="0")).hang_timeout == 0.0
    given = resolve(config={"hang_timeout": 30})
    assert (given.hang_timeout, given.hang_auto, given.warnings) == (30.0, False, ())
    late = resolve(LaunchFlags(hang_timeout="600"))
    assert late.hang_timeout == 600.0 and not late.hang_auto
    assert any("hang timeout 600 s >= distributed.timeout_s 300 s" in w for w in late.warnings)
    for bad in ("-1", "soon", "inf"):
        with pytest.raises(RunSpecError):
            parse_hang_timeout(bad)


# -- after the probe: GPUs per node ----------------------------------------------------------------

def test_resolve_nproc():
    assert resolve_nproc("auto", {"a": 8, "b": 8}, "rocm") == 8
    assert resolve_nproc(4, {"a": 8, "b": 4}, "cuda") == 4
    with pytest.raises(RunSpecError, match="different GPU counts .* --nproc 4"):
        resolve_nproc("auto", {"a": 8, "b": 4}, "rocm")
    with pytest.raises(RunSpecError, match="b has 4"):
        resolve_nproc(8, {"a": 8, "b": 4}, "rocm")
    with pytest.raises(RunSpecError, match="no GPU found on b"):
        resolve_nproc(1, {"a": 1, "b": 0}, "cuda")
    assert resolve_nproc(2, {"a": 0}, "cpu") == 2


# -- environment -----------------------------------------------------------------------------------

def test_nccl_env_pinned_and_ctas_on_cuda_only():
    assert nccl_env(42, 512, pin_channels=True, accelerator="rocm") == {
        "NCCL_MIN_NCHANNELS": "42", "NCCL_MAX_NCHANNELS": "42",
        "RCCL_THREADS_PER_BLOCK": "512", "NCCL_NTHREADS": "512"}
    cuda = nccl_env(42, 256, pin_channels=True, accelerator="cuda")
    assert cuda["NCCL_MIN_CTAS"] == cuda["NCCL_MAX_CTAS"] == "42"
    unpinned = nccl_env(42, 256, pin_channels=False, accelerator="cuda")
    assert "NCCL_MIN_NCHANNELS" not in unpinned and "NCCL_MIN_CTAS" not in unpinned
    assert unpinned["NCCL_MAX_NCHANNELS"] == unpinned["NCCL_MAX_CTAS"] == "42"


def test_socket_env():
    assert socket_env("ens5") == {"NCCL_SOCKET_IFNAME": "ens5", "GLOO_SOCKET_IFNAME": "ens5"}


# -- naming and argv -------------------------------------------------------------------------------

def test_run_ids_and_dirs():
    when = datetime(2025, 12, 11, 14, 30, 52)
    assert run_id_base(28, 256, when) == "multinode_28ch_256th_20251211_143052"
    ids = list(islice(run_id_candidates(28, 256, when), 50))
    assert all(re.fullmatch(r"multinode_28ch_256th_20251211_143052_[0-9a-f]{6}", i) for i in ids)
    assert len(set(ids)) == len(ids)  # random, so another user cannot guess the next one
    fixed = iter(["aaaaaa", "bbbbbb"])
    assert list(islice(run_id_candidates(28, 256, when, token=lambda n: next(fixed)), 2)) == [
        "multinode_28ch_256th_20251211_143052_aaaaaa", "multinode_28ch_256th_20251211_143052_bbbbbb"]
    assert output_dir_name(28, 256) == "256thread_28channels"
    assert node_run_dir("/srv/gemm", "r1") == "/srv/gemm/experiments/r1"


def test_two_launches_in_the_same_second_get_their_own_directories(tmp_path):
    from tasks.run.plan import pick_run_id

    spec = resolve(LaunchFlags())
    when = datetime(2025, 12, 11, 14, 30, 52)
    first = pick_run_id(spec, tmp_path, when, create=True)
    second = pick_run_id(spec, tmp_path, when, create=True)
    assert first != second and all(i.startswith("multinode_28ch_256th_20251211_143052_")
                                   for i in (first, second))
    for run_id in (first, second):
        assert (tmp_path / run_id).is_dir()
        assert (tmp_path / run_id).stat().st_mode & 0o777 == 0o700  # not world-readable
    unmade = pick_run_id(spec, tmp_path, when, create=False)
    assert unmade not in (first, second)
    assert not (tmp_path / unmade).exists()  # without create, nothing is made


def test_a_directory_already_there_is_never_taken_over(tmp_path):
    """Created exclusively: an existing directory of the same name (planted, or a collision of
    the random suffix) is skipped, never reused."""
    from tasks.run.plan import pick_run_id

    spec = resolve(LaunchFlags())
    when = datetime(2025, 12, 11, 14, 30, 52)
    planted = tmp_path / "multinode_28ch_256th_20251211_143052_aaaaaa"
    planted.mkdir()
    (planted / "run.json").write_text("theirs")
    tokens = iter(["aaaaaa", "bbbbbb"])
    run_id = pick_run_id(spec, tmp_path, when, create=True, token=lambda n: next(tokens))
    assert run_id == "multinode_28ch_256th_20251211_143052_bbbbbb"
    assert (planted / "run.json").read_text() == "theirs"


def test_torchrun_argv():
    argv = torchrun_argv(nnodes=2, nproc=4, master_addr="10.0.0.1",
                         config_path="/w/experiments/r/train_config.yaml", output_dir="/w/o",
                         overrides=("training.max_steps=3",))
    assert argv[0] == "torchrun"
    assert {"--nnodes=2", "--nproc-per-node=4", "--master-addr=10.0.0.1",
            "--max-restarts=0"} <= set(argv)
    # The port is env.sh's PET_MASTER_PORT: an argv is every local user's to read.
    assert not any("port" in a for a in argv)
    assert not any(a.startswith("--node-rank") for a in argv)  # the node launcher adds it
    module = argv.index("-m")
    assert argv[module:] == ["-m", "train", "--config", "/w/experiments/r/train_config.yaml",
                             "--override", "training.output_dir=/w/o",
                             "--override", "training.max_steps=3"]


# -- launch.py's config reading --------------------------------------------------------------------

def test_explicit_launch_config_ignores_builtin_defaults(tmp_path):
    from invoke import Config

    from tasks.lib.runspec import explicit_launch_config
    from tasks.lib.settings import default_config

    runtime = tmp_path / "runtime.yaml"
    runtime.write_text("launch:\n  threads: 512\n")
    config = Config(runtime_path=str(runtime))
    config.load_collection(default_config())
    config.load_runtime()
    assert config.launch.channels == 28  # the built-in default is in the tree ...
    assert explicit_launch_config(config) == {"threads": 512}  # ... but not set by the user
    config.launch.nproc = 4
    assert explicit_launch_config(config) == {"threads": 512, "nproc": 4}


def test_launch_and_check_share_one_resolution():
    """fab check calls resolve_launch_values (through tasks.cluster.preflight.launch_defaults): env values
    the launch honours are the ones the check judges, in the same order."""
    environ = {"NPROC_PER_NODE": "4", "MASTER_PORT": "29600"}
    values = resolve_launch_values(LaunchFlags(), {}, environ, accelerator="rocm")
    assert (values.nproc, values.master_port) == (4, 29600)
    assert values.sources["nproc"] == "env NPROC_PER_NODE"
    spec = resolve(environ=environ)
    assert (spec.nproc, spec.master_port) == (values.nproc, values.master_port)
    values = resolve_launch_values(LaunchFlags(), {"nproc": "auto"}, environ, accelerator="rocm")
    assert values.nproc == "auto" and values.sources["nproc"] == "config"
    assert resolve_launch_values(LaunchFlags(), {}, {}, accelerator="cpu").nproc == 2
    with pytest.raises(RunSpecError, match="NPROC_PER_NODE: 'x' is not an integer"):
        resolve_launch_values(LaunchFlags(), {}, {"NPROC_PER_NODE": "x"}, accelerator="rocm")


def test_check_uses_the_launch_resolution():
    from invoke import Config, Context

    from tasks.cluster.preflight import launch_defaults
    from tasks.cluster.session import ClusterSession

    config = Config(overrides={"cluster": {"hosts": ["127.0.0.1:9", "127.0.0.1:10"]},
                               "docker": {"platform": "rocm"}})
    with ClusterSession(Context(config)) as session:  # no host is contacted
        values = launch_defaults(session, config, {"NPROC_PER_NODE": "4", "MASTER_PORT": "29601"})
    assert (values.nproc, values.master_port) == (4, 29601)


def test_builtins_are_the_launch_settings_defaults():
    """BUILTINS is derived from LaunchSettings, not a copy: change a default there, it follows."""
    script = (
        "import dataclasses, tasks.lib.settings as s\n"
        "@dataclasses.dataclass(frozen=True)\n"
        "class Changed(s.LaunchSettings):\n"
        "    channels: int = 12\n"
        "    hang_timeout: float = 5.0\n"
        "s.LaunchSettings = Changed\n"
        "from tasks.lib.runspec import BUILTINS\n"
        "print(BUILTINS['channels'], BUILTINS['hang_timeout'])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["12", "5.0"]
    from tasks.lib.settings import LaunchSettings

    defaults = LaunchSettings()
    assert all(BUILTINS[name] == getattr(defaults, name) for name in BUILTINS)
