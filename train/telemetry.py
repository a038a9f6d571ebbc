"""SM clock, power and temperature of this rank's GPU, read on the host (no torch).

NVML (nvidia-ml-py, ``import pynvml``) on CUDA, amdsmi on ROCm when it is importable. Each
reading is a driver query of the host (tens of microseconds), not a device synchronisation, so
the trainer takes it while the step runs. A counter the device does not expose, a library that
is absent, or a CPU run gives None: a number is never made up.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FIELDS = ("sm_clock_mhz", "power_w", "temperature_c")
NO_GPU = "no GPU (CPU run): nothing to read"


def _empty() -> dict[str, float | None]:
    return {name: None for name in FIELDS}


@dataclass
class DeviceIdentity:
    """What identifies this rank's GPU to a management library (from torch's properties)."""

    index: int
    uuid: str | None = None
    pci_bus_id: str | None = None  # "0000:1b:00.0"
    is_hip: bool = False


@dataclass
class Telemetry:
    """Reads the counters; ``source`` None means no reading is possible (``reason`` says why)."""

    source: str | None
    reason: str | None = None
    readers: dict[str, Callable[[], float | None]] = field(default_factory=dict)
    shutdown: Callable[[], None] | None = None

    def sample(self) -> dict[str, float | None]:
        values = _empty()
        for name, read in self.readers.items():
            try:
                value = read()
            except Exception:  # noqa: BLE001 - a counter that fails once is unknown, not fatal
                value = None
            values[name] = None if value is None else round(float(value), 2)
        return values

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "reason": self.reason, "fields": sorted(self.readers)}

    def close(self) -> None:
        if self.shutdown is not None:
            try:
                self.shutdown()
            except Exception:  # noqa: BLE001 - shutting down a library must not fail a run
                pass
            self.shutdown = None


def pci_address(text: str | None) -> tuple[int, int, int, int] | None:
    """(domain, bus, device, function) of "0000:1b:00.0" or "00000000:1B:00.0"; None if not one."""
    if not text:
        return None
    try:
        domain, bus, rest = text.strip().split(":")
        device, function = rest.split(".")
        return int(domain, 16), int(bus, 16), int(device, 16), int(function, 16)
    except ValueError:
        return None


def unavailable(reason: str) -> Telemetry:
    return Telemetry(source=None, reason=reason)


def open_telemetry(identity: DeviceIdentity | None, enabled: bool = True) -> Telemetry:
    """The reader for this rank's device: NVML, amdsmi, or none (with the reason)."""
    if not enabled:
        return unavailable("telemetry.enabled is false")
    if identity is None:
        return unavailable(NO_GPU)
    if identity.is_hip:
        return _open_amdsmi(identity)
    return _open_nvml(identity)


def _nvml_handle(pynvml: Any, identity: DeviceIdentity) -> Any:
    """NVML numbers devices without CUDA_VISIBLE_DEVICES: find ours by UUID, then PCI bus id,
    and by index only when no device is hidden from this process."""
    if identity.uuid:
        uuid = identity.uuid if identity.uuid.startswith("GPU-") else f"GPU-{identity.uuid}"
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(uuid)
        except pynvml.NVMLError:
            pass
    if identity.pci_bus_id:
        try:
            return pynvml.nvmlDeviceGetHandleByPciBusId_v2(identity.pci_bus_id)
        except (pynvml.NVMLError, AttributeError):
            pass
    if not os.environ.get("CUDA_VISIBLE_DEVICES"):
        return pynvml.nvmlDeviceGetHandleByIndex(identity.index)
    raise LookupError("this GPU's UUID and PCI bus id are unknown to NVML")


def _open_nvml(identity: DeviceIdentity) -> Telemetry:
    try:
        import pynvml
    except ImportError:
        return unavailable("nvidia-ml-py (pynvml) is not installed")
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound and friends
        return unavailable(f"NVML init failed: {exc}")
    try:
        handle = _nvml_handle(pynvml, identity)
    except Exception as exc:  # noqa: BLE001
        pynvml.nvmlShutdown()
        return unavailable(f"NVML has no handle for this GPU: {exc}")
    readers: dict[str, Callable[[], float | None]] = {
        "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
        # milliwatts; on recent GPUs the driver's figure is averaged over a short window
        "power_w": lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
        "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(
            handle, pynvml.NVML_TEMPERATURE_GPU
        ),
    }
    return Telemetry("nvml", None, _working(readers), pynvml.nvmlShutdown)


def _open_amdsmi(identity: DeviceIdentity) -> Telemetry:
    try:
        import amdsmi
    except ImportError:
        return unavailable("amdsmi is not importable on this ROCm node")
    try:
        amdsmi.amdsmi_init()
        handles = amdsmi.amdsmi_get_processor_handles()
        handle = None
        wanted = pci_address(identity.pci_bus_id)
        if wanted is not None:
            for candidate in handles:
                if pci_address(str(amdsmi.amdsmi_get_gpu_device_bdf(candidate))) == wanted:
                    handle = candidate
        if handle is None and not os.environ.get("HIP_VISIBLE_DEVICES") and not os.environ.get(
            "ROCR_VISIBLE_DEVICES"
        ):
            handle = handles[identity.index]
        if handle is None:
            raise LookupError("this GPU's PCI bus id is unknown to amdsmi")
    except Exception as exc:  # noqa: BLE001
        return unavailable(f"amdsmi has no handle for this GPU: {exc}")

    def power() -> float | None:
        info = amdsmi.amdsmi_get_power_info(handle)
        for key in ("current_socket_power", "average_socket_power"):
            value = info.get(key)
            if isinstance(value, (int, float)):
                return float(value)
        return None

    readers: dict[str, Callable[[], float | None]] = {
        "sm_clock_mhz": lambda: amdsmi.amdsmi_get_clock_info(handle, amdsmi.AmdSmiClkType.GFX)[
            "clk"
        ],
        "power_w": power,
        "temperature_c": lambda: amdsmi.amdsmi_get_temp_metric(
            handle,
            amdsmi.AmdSmiTemperatureType.HOTSPOT,
            amdsmi.AmdSmiTemperatureMetric.CURRENT,
        ),
    }
    return Telemetry("amdsmi", None, _working(readers), amdsmi.amdsmi_shut_down)


Reader = Callable[[], float | None]


def _working(readers: dict[str, Reader]) -> dict[str, Reader]:
    """Only the counters that answer once: a counter the device lacks (NotSupported) is left
    out, so its field stays None instead of failing every step."""
    kept = {}
    for name, read in readers.items():
        try:
            if read() is not None:
                kept[name] = read
        except Exception:  # noqa: BLE001
            continue
    return kept
