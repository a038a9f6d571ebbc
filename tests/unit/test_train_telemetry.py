"""train.telemetry: null on CPU with the reason; the NVML path on a stand-in pynvml module.

This machine has no GPU and no NVML library, so the NVML calls are served by a small module
put in sys.modules; the real library is exercised on the device GPU by scripts/bench_gemm.py.
"""

from __future__ import annotations

import sys
import types

import pytest

from train.telemetry import NO_GPU, DeviceIdentity, open_telemetry, pci_address


def test_cpu_and_disabled_read_nothing() -> None:
    cpu = open_telemetry(None)
    assert cpu.source is None and cpu.reason == NO_GPU
    assert cpu.sample() == {"sm_clock_mhz": None, "power_w": None, "temperature_c": None}
    off = open_telemetry(DeviceIdentity(0, uuid="abc"), enabled=False)
    assert off.source is None and "enabled is false" in (off.reason or "")


class NVMLError(Exception):
    pass


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    calls: list[str] = []

    def by_uuid(uuid: str) -> str:
        calls.append(uuid)
        if uuid != "GPU-1234":
            raise NVMLError("not found")
        return "handle"

    def temperature(handle: str, sensor: int) -> int:
        raise NVMLError("NotSupported")  # a counter this device lacks

    module = types.SimpleNamespace(
        NVMLError=NVMLError, NVML_CLOCK_SM=1, NVML_TEMPERATURE_GPU=0,
        nvmlInit=lambda: None, nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetHandleByUUID=by_uuid,
        nvmlDeviceGetClockInfo=lambda handle, clock: 1980,
        nvmlDeviceGetPowerUsage=lambda handle: 412_345,  # mW
        nvmlDeviceGetTemperature=temperature,
    )
    monkeypatch.setitem(sys.modules, "pynvml", module)
    module.calls = calls
    return module


def test_nvml_readings_and_a_missing_counter(fake_nvml: types.SimpleNamespace) -> None:
    telemetry = open_telemetry(DeviceIdentity(0, uuid="1234"))
    assert telemetry.source == "nvml" and fake_nvml.calls == ["GPU-1234"]
    assert telemetry.sample() == {"sm_clock_mhz": 1980.0, "power_w": 412.35,
                                  "temperature_c": None}
    assert telemetry.describe()["fields"] == ["power_w", "sm_clock_mhz"]
    telemetry.close()
    assert fake_nvml.calls[-1] == "shutdown"


def test_a_gpu_nvml_cannot_find_is_null_with_the_reason(
        fake_nvml: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    # CUDA_VISIBLE_DEVICES renumbers devices: an index would name another GPU.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    telemetry = open_telemetry(DeviceIdentity(0, uuid="ffff"))
    assert telemetry.source is None and "no handle" in (telemetry.reason or "")
    assert telemetry.sample()["sm_clock_mhz"] is None


def test_pci_addresses_compare_across_spellings() -> None:
    assert pci_address("0000:1b:00.0") == pci_address("00000000:1B:00.0") == (0, 27, 0, 0)
    assert pci_address("nonsense") is None and pci_address(None) is None


def test_a_cpu_run_never_imports_nvml() -> None:
    # pynvml is installed here (requirements-train.txt): only a CUDA device may load it.
    import subprocess
    from pathlib import Path

    check = ("import sys\n"
             "from train.telemetry import open_telemetry\n"
             "t = open_telemetry(None)\n"
             "assert t.source is None and t.sample()['sm_clock_mhz'] is None\n"
             "assert 'pynvml' not in sys.modules and 'amdsmi' not in sys.modules\n"
             "import pynvml\n")  # and it is importable, so the check above could fail
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", check], cwd=repo, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
