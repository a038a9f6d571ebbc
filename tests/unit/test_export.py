"""fab report --export FILE / --export-preset NAME: the chosen point's variables, exactly, in a file
a plain shell sources and in a preset `fab launch --nccl-preset` reads back; refused without a
single best point unless --pick names one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tasks.lib.render import NCCL_PRESETS_DIR, load_nccl_preset
from tasks.lib.report import export as exporting
from tasks.lib.runspec import LaunchFlags, RunSpecError, resolve_run_spec
from tasks.lib.report.outputs import write_report
from tests.unit.report_fixtures import make_repeated_sweep

ROOT = Path(__file__).resolve().parents[2]
FAB = str(Path(sys.executable).parent / "fab")
ALGO = "allreduce:tree;broadcast:ring"   # ';' would end a command if it were not quoted


def sourced(path: Path) -> dict[str, str]:
    """What a plain `bash -c '. FILE; env'` sees, minus the shell's own environment."""
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    base = subprocess.run(["bash", "-c", "env -0"], capture_output=True, env=clean, check=True).stdout
    after = subprocess.run(["bash", "-c", f". {path}; env -0"], capture_output=True, env=clean, check=True).stdout

    def parse(raw: bytes) -> dict[str, str]:
        return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)

    before, now = parse(base), parse(after)
    return {k: v for k, v in now.items() if before.get(k) != v and k not in ("SHLVL", "_", "PWD", "OLDPWD")}


def winner_sweep(tmp_path: Path) -> Path:
    return make_repeated_sweep(tmp_path, [
        (4, 256, {"NCCL_ALGO": "Ring"}, [100.0, 101.0, 99.5], {}),
        (32, 256, {"NCCL_ALGO": ALGO}, [80.0, 80.8, 79.6], {}),
    ], repeat=3)


def test_the_export_sourced_by_a_plain_shell_gives_the_points_variables_exactly(tmp_path: Path) -> None:
    sweep_dir = winner_sweep(tmp_path)
    out = tmp_path / "best.env"
    result = subprocess.run([FAB, "report", str(sweep_dir), "--no-plots", "--export", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"exported 32ch × 256th NCCL_ALGO={ALGO} to {out}" in result.stdout
    got = sourced(out)
    # Exactly what each of the point's runs exported (run.json's env: env.sh's common part).
    document = json.loads((sweep_dir / "sweep.json").read_text())
    for point in (p for p in document["points"] if p["config"] == 1):
        recorded = json.loads((sweep_dir / point["run_dir"] / "run.json").read_text())["env"]
        assert got == recorded
    assert got["NCCL_ALGO"] == ALGO and got["NCCL_MIN_CTAS"] == "32" and got["NCCL_NTHREADS"] == "256"
    header = [line for line in out.read_text().splitlines() if line.startswith("#")]
    assert header[0].startswith(f"# NCCL/RCCL settings chosen by `fab report` from {sweep_dir}")
    assert any(line.startswith("# nodes: node0, node1; fingerprint ") for line in header)
    assert any("the best point: " in line and "ahead of the runner-up 4ch × 256th NCCL_ALGO=Ring" in line
               for line in header)


def test_without_a_single_best_point_the_export_needs_a_pick(tmp_path: Path) -> None:
    sweep_dir = make_repeated_sweep(tmp_path, [
        (4, 256, {}, [100.0, 103.0, 98.0], {}), (32, 256, {}, [99.0, 101.5, 102.0], {})], repeat=3, noise=2.0)
    out = tmp_path / "x.env"
    refused = subprocess.run([FAB, "report", str(sweep_dir), "--no-plots", "--export", str(out)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and not out.exists()
    assert "report: no single best point to export: 2 points within noise" in refused.stderr
    assert "Name one with --pick POINT (by the secondary criterion: --pick 4x256)" in refused.stderr
    picked = subprocess.run([FAB, "report", str(sweep_dir), "--no-plots", "--export", str(out),
                             "--pick", "32x256"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert picked.returncode == 0, picked.stderr
    assert sourced(out)["NCCL_MAX_NCHANNELS"] == "32"
    assert "# why this point: picked with --pick: no single best point" in out.read_text()
    unknown = subprocess.run([FAB, "report", str(sweep_dir), "--no-plots", "--export", str(out),
                              "--pick", "8x256"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "--pick 8x256: no such point; the points are 4x256, 32x256" in unknown.stderr


def test_a_node_value_in_the_header_cannot_break_out_of_the_comment(tmp_path: Path) -> None:
    sweep_dir = winner_sweep(tmp_path)
    canary = tmp_path / "pwned"
    for run_json in tmp_path.glob("multinode_32ch_*/run.json"):
        record = json.loads(run_json.read_text())
        record["nodes"][0]["host"] = f"node0\ntouch {canary}\n"
        run_json.write_text(json.dumps(record))
    result = write_report(sweep_dir, plots=False)
    chosen = exporting.build_export(result.rows, result.decision, result.runs, result.input.sweep, "s", None)
    path = tmp_path / "e.env"
    path.write_text(exporting.export_script(chosen))
    sourced(path)
    assert not canary.exists()
    assert all(line.startswith(("# ", "export ")) for line in path.read_text().splitlines())


def test_the_preset_round_trips_through_fab_launch(tmp_path: Path) -> None:
    sweep_dir = winner_sweep(tmp_path)
    name = f"test-export-{uuid.uuid4().hex[:8]}"
    path = NCCL_PRESETS_DIR / f"{name}.yaml"
    try:
        result = subprocess.run([FAB, "report", str(sweep_dir), "--no-plots", "--export-preset", name],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        preset = load_nccl_preset(name)
        assert preset == {"NCCL_MIN_NCHANNELS": "32", "NCCL_MAX_NCHANNELS": "32", "NCCL_MIN_CTAS": "32",
                          "NCCL_MAX_CTAS": "32", "RCCL_THREADS_PER_BLOCK": "256", "NCCL_NTHREADS": "256",
                          "NCCL_ALGO": ALGO}
        again = subprocess.run([FAB, "report", str(sweep_dir), "--no-plots", "--export-preset", name],
                               cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert again.returncode == 2 and "exists; choose another preset name" in again.stderr
        # fab launch --nccl-preset NAME, no --channels/--threads: the dry run exports the point.
        config = tmp_path / "local.yaml"
        config.write_text(yaml.safe_dump({"cluster": {"hosts_file": str(tmp_path / "none.txt"),
                                                      "experiments_dir": str(tmp_path / "exp")}}))
        dry = subprocess.run([FAB, "-f", str(config), "launch", "--nccl-preset", name, "--dry-run"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert dry.returncode == 0, dry.stdout[-2000:] + dry.stderr
        exports = dict(line.strip().removeprefix("export ").split("=", 1)
                       for line in dry.stdout.splitlines() if line.strip().startswith("export NCCL_")
                       or line.strip().startswith("export RCCL_"))
        cpu = {k: v for k, v in preset.items() if "CTAS" not in k}   # the embedded default is CPU
        assert {k: exports[k] for k in cpu} == {k: f"'{v}'" if ";" in v else v for k, v in cpu.items()}
    finally:
        path.unlink(missing_ok=True)


def test_a_preset_gives_channels_and_threads_unless_a_flag_does(tmp_path: Path) -> None:
    presets = {"p": {"NCCL_MIN_NCHANNELS": "32", "NCCL_MAX_NCHANNELS": "32", "NCCL_NTHREADS": "512",
                     "NCCL_PROTO": "Simple"},
               "unpinned": {"NCCL_MAX_NCHANNELS": "16"}, "bad": {"NCCL_NTHREADS": "many"}}

    def spec(flags: LaunchFlags, **kwargs):
        return resolve_run_spec(flags, {}, {}, accelerator="cpu", docker_default=False, project_root=ROOT,
                                validate_config=lambda *_: None, preset_loader=presets.__getitem__, **kwargs)

    from_preset = spec(LaunchFlags(nccl_preset="p"))
    assert (from_preset.channels, from_preset.threads, from_preset.pin_channels) == (32, 512, True)
    assert from_preset.sources["channels"] == "NCCL preset p"
    flagged = spec(LaunchFlags(nccl_preset="p", channels=8))
    assert (flagged.channels, flagged.threads) == (8, 512)
    assert "--channels 8 replaces the channels of NCCL preset p (32)" in flagged.warnings
    assert spec(LaunchFlags(nccl_preset="unpinned")).pin_channels is False
    with pytest.raises(RunSpecError, match="NCCL preset bad: threads"):
        spec(LaunchFlags(nccl_preset="bad"))
    # The built-in presets set no channel or thread variable: nothing changes for them.
    ib = resolve_run_spec(LaunchFlags(nccl_preset="ib"), {}, {}, accelerator="cpu", docker_default=False,
                          project_root=ROOT, validate_config=lambda *_: None, preset_loader=load_nccl_preset)
    assert ib.sources["channels"] == "built-in"
