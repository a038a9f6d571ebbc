"""train.config: loading, overrides, validation; `python -m train` config errors (exit 2, fast)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import assert_imports_none_of
from train.config import ConfigError, build_config, known_keys, load_config, split_overrides

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "config" / "multi_node"


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["cpu_tiny.yaml", "distributed_multinode.yaml"])
def test_shipped_configs_load(name: str) -> None:
    config = load_config(CONFIGS / name)
    assert config.model.layers >= 1
    assert config.source.endswith(name)


def test_gpu_default_is_gpu_sized() -> None:
    config = load_config(CONFIGS / "distributed_multinode.yaml")
    assert (config.model.tokens, config.model.hidden, config.training.dtype) == (8192, 8192, "bf16")


def test_file_values_and_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  layers: 3\ncomm:\n  overlap: false\n")
    config = load_config(path)
    assert config.model.layers == 3
    assert config.comm.overlap is False
    assert config.model.hidden == 8192  # default kept


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")).training.max_steps == 100


def test_overrides_apply_in_order_and_parse_yaml_scalars(tmp_path: Path) -> None:
    path = write(tmp_path, "training:\n  max_steps: 5\n")
    config = load_config(
        path,
        [
            "training.max_steps=7 training.lr=1e-3",
            "comm.overlap=false",
            "training.max_steps=9",
            "comm.bucket_mb=4",
            "training.output_dir=/tmp/x y",
        ],
    )
    assert config.training.max_steps == 9  # the last of several wins, none is dropped
    assert config.training.lr == pytest.approx(1e-3)
    assert config.comm.overlap is False
    assert config.comm.bucket_mb == 4.0 and isinstance(config.comm.bucket_mb, float)
    assert config.training.output_dir == "/tmp/x y"
    assert config.overrides[-1] == "training.output_dir=/tmp/x y"


@pytest.mark.parametrize(("override", "parsed"), [
    ("model.layers=null", "got None"),                # YAML null, not the string 'null'
    ("training.lr=[0.9,0.98]", "got [0.9, 0.98]"),    # a YAML list, not a string
    ("model.hidden=1.5", "got 1.5"),                  # a float, not a string
])
def test_override_values_are_yaml_scalars_even_when_refused(override: str, parsed: str) -> None:
    with pytest.raises(ConfigError) as raised:
        build_config({}, [override])
    message = str(raised.value)
    assert f"(--override {override})" in message and message.endswith(parsed), message


def test_split_overrides_keeps_spaces_inside_values() -> None:
    assert split_overrides(["a.b=1 c.d=[0.9, 0.98]", "e.f=x"]) == [
        "a.b=1",
        "c.d=[0.9, 0.98]",
        "e.f=x",
    ]


@pytest.mark.parametrize(
    ("data", "overrides", "fragment"),
    [
        ({"model": {"layer": 2}}, [], "unknown key 'model.layer'"),
        ({"modle": {}}, [], "unknown section 'modle'"),
        ({"model": {"layers": 0}}, [], "model.layers must be >= 1"),
        ({"training": {"max_steps": -3}}, [], "training.max_steps must be >= 1"),
        ({"model": {"layers": "four"}}, [], "model.layers must be an integer"),
        ({"model": {"layers": 2.5}}, [], "model.layers must be an integer"),
        ({"model": {"layers": True}}, [], "model.layers must be an integer"),
        ({"comm": {"overlap": "yes please"}}, [], "comm.overlap must be true or false"),
        ({"training": {"dtype": "fp8"}}, [], "training.dtype must be one of bf16, fp16, fp32"),
        ({"comm": {"collective": "alltoall"}}, [], "comm.collective must be one of"),
        ({"distributed": {"timeout_s": 0}}, [], "distributed.timeout_s must be > 0"),
        ({"training": {"lr": float("nan")}}, [], "training.lr must be finite"),
        ({}, ["model.layers=0"], "--override model.layers=0"),
        ({}, ["nosuch.key=1"], "unknown key 'nosuch.key'"),
        ({}, ["model.nosuch=1"], "unknown key 'model.nosuch'"),
        ({}, ["max_steps"], "not key=value"),
        (
            {"profiling": {"enabled": True, "wait": 5, "active": 10}, "training": {"max_steps": 4}},
            [],
            "profiling.wait+warmup+active",
        ),
        ({"comm": {"stream_priority": "urgent"}}, [],
         "comm.stream_priority must be one of high, default"),
        ({}, ["calibration.interval_steps=-1"], "calibration.interval_steps must be >= 0"),
        ({}, ["telemetry.sample_every=0"], "telemetry.sample_every must be >= 1"),
        ({}, ["debug.delay_rank=-2"], "debug.delay_rank must be >= -1"),
        ({}, ["debug.delay_every=0"], "debug.delay_every must be >= 1"),
        ({}, ["debug.delay_ms=20"], "debug.delay_ms 20.0 needs debug.delay_rank"),
    ],
)
def test_invalid_values_name_key_and_source(
    data: dict, overrides: list[str], fragment: str
) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(data, overrides, source="cfg.yaml")
    message = str(err.value)
    assert fragment in message
    assert "cfg.yaml" in message
    assert "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  layers: [1,\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+"):
        load_config(path)


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_known_keys_cover_the_contract() -> None:
    keys = set(known_keys())
    for key in (
        "training.max_steps",
        "training.output_dir",
        "training.log_interval",
        "training.dtype",
        "training.warmup_steps",
        "model.layers",
        "model.tokens",
        "model.hidden",
        "comm.collective",
        "comm.bucket_mb",
        "comm.overlap",
        "distributed.timeout_s",
        "distributed.backend",
        "calibration.compute_steps",
        "calibration.comm_steps",
        "profiling.enabled",
        "profiling.wait",
        "profiling.warmup",
        "profiling.active",
        "profiling.repeat",
        "profiling.launch_delay_steps",
        "comm.stream_priority",
        "calibration.interval_steps",
        "calibration.interval_compute_steps",
        "calibration.interval_comm_steps",
        "telemetry.enabled",
        "telemetry.sample_every",
        "debug.delay_rank",
        "debug.delay_ms",
        "debug.delay_every",
    ):
        assert key in keys, key


def test_config_module_does_not_import_torch() -> None:
    assert_imports_none_of(
        ("torch",), "import train.config, train.intervals, train.metrics, train.outputs, train.cli")


def run_cli(
    *args: str, cwd: Path = REPO, poison_torch: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m train``; with ``poison_torch`` (a directory), importing torch fails loudly.

    The promise is "config errors before torch is imported"; a poisoned torch package first on
    the path tests that directly, where a wall-clock bound would only flake on a busy machine.
    """
    path = [str(REPO)]
    if poison_torch is not None:
        package = poison_torch / "torch"
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").write_text('raise SystemExit("POISONED: torch was imported")\n')
        path.insert(0, str(poison_torch))
    return subprocess.run(
        [sys.executable, "-m", "train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": os.pathsep.join(path), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize(
    ("body", "overrides", "fragment"),
    [
        ("model:\n  layerz: 2\n", [], "unknown key 'model.layerz'"),
        ("model:\n  layers: 0\n", [], "model.layers must be >= 1"),
        ("training:\n  max_steps: -1\n", [], "training.max_steps must be >= 1"),
        ("model:\n  hidden: big\n", [], "model.hidden must be an integer"),
        ("", ["training.dtype=int4"], "training.dtype must be one of"),
    ],
)
def test_cli_config_errors_exit_2_fast_one_line(
    tmp_path: Path, body: str, overrides: list[str], fragment: str
) -> None:
    path = write(tmp_path, body)
    extra = ["--override", *overrides] if overrides else []
    proc = run_cli("--config", str(path), *extra, poison_torch=tmp_path / "poison")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert fragment in lines[0] and str(path) in lines[0]
    assert proc.stdout == ""
    assert "POISONED" not in proc.stderr  # refused before torch was imported


def test_cli_missing_file_exit_2(tmp_path: Path) -> None:
    proc = run_cli("--config", str(tmp_path / "nope.yaml"), poison_torch=tmp_path / "poison")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "nope.yaml" in proc.stderr and "not found" in proc.stderr
    assert "POISONED" not in proc.stderr  # refused before torch was imported


def test_cli_missing_config_flag_exit_2_one_line() -> None:
    proc = run_cli()
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "--config" in proc.stderr


def test_cli_check_validates_without_running(tmp_path: Path) -> None:
    proc = run_cli(
        "--config",
        str(CONFIGS / "cpu_tiny.yaml"),
        "--check",
        "--override",
        f"training.output_dir={tmp_path / 'o'}",
        poison_torch=tmp_path / "poison",
    )
    assert proc.returncode == 0, proc.stderr
    assert "config OK" in proc.stdout
    assert not (tmp_path / "o").exists()
    assert "POISONED" not in proc.stderr  # refused before torch was imported


def test_cli_refuses_output_dir_of_an_earlier_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "rank_00_metrics.jsonl").write_text('{"step": 1}\n')
    proc = run_cli(
        "--config",
        str(CONFIGS / "cpu_tiny.yaml"),
        "--override",
        f"training.output_dir={out}",
        poison_torch=tmp_path / "poison",
    )
    assert proc.returncode == 2
    assert "training.output_dir" in proc.stderr and "earlier run" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (out / "rank_00_metrics.jsonl").read_text() == '{"step": 1}\n'  # untouched
    assert "POISONED" not in proc.stderr  # refused before torch was imported
