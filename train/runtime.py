"""Hardware checks, device choice and process-group setup/teardown (imports torch).

``plan_runtime`` runs after the config is loaded and before any process group starts; it
raises ConfigError for what the hardware cannot do, so those failures exit 2 like any other
config error.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from train.config import ConfigError, TrainConfig
from train.rendezvous import take_secret, verify_store
from train.telemetry import DeviceIdentity

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class RuntimePlan:
    """Where and how this rank runs, decided before the process group starts."""

    backend: str  # "nccl" or "gloo"
    device: torch.device
    dtype: torch.dtype
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def _visible_devices_note() -> str:
    for name in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        if name in os.environ:
            return f" ({name}={os.environ[name]!r})"
    return ""


def _cpu_supports(dtype_name: str) -> bool:
    # These probes exist in torch >= 2.0; without them assume support rather than refuse.
    probe = {
        "bf16": "_is_mkldnn_bf16_supported",
        "fp16": "_is_mkldnn_fp16_supported",
    }.get(dtype_name)
    if probe is None:
        return True
    fn = getattr(torch.ops.mkldnn, probe, None)
    if fn is None:
        return True
    try:
        return bool(fn())
    except RuntimeError:
        return True


def plan_runtime(config: TrainConfig) -> RuntimePlan:
    """Chooses backend and device for this rank; raises ConfigError naming the key."""
    source = config.source
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0

    backend = config.distributed.backend
    if backend == "auto":
        backend = "nccl" if gpus > 0 else "gloo"
    if backend == "nccl":
        if gpus == 0:
            raise ConfigError(
                f"{source}: distributed.backend nccl needs a GPU but none is visible"
                f"{_visible_devices_note()}; use gloo or auto"
            )
        if not dist.is_nccl_available():
            raise ConfigError(f"{source}: distributed.backend nccl: this torch build lacks NCCL")
        if local_rank >= gpus:
            raise ConfigError(
                f"{source}: LOCAL_RANK {local_rank} has no GPU: {gpus} visible"
                f"{_visible_devices_note()}; launch at most {gpus} processes per node"
            )
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    delay_rank = config.debug.delay_rank
    if delay_rank >= world_size:
        raise ConfigError(
            f"{source}: debug.delay_rank {delay_rank} is not a rank of this run (world size "
            f"{world_size}); use 0..{world_size - 1} or -1"
        )

    dtype_name = config.training.dtype
    if device.type == "cuda":
        if dtype_name == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError(
                f"{source}: training.dtype bf16 is not supported by "
                f"{torch.cuda.get_device_name(device)}; use fp16 or fp32"
            )
    elif not _cpu_supports(dtype_name):
        raise ConfigError(
            f"{source}: training.dtype {dtype_name} is not supported by this CPU; use fp32"
        )

    return RuntimePlan(
        backend=backend,
        device=device,
        dtype=DTYPES[dtype_name],
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nccl_options(high_priority: bool, timeout: datetime.timedelta) -> object | None:
    """ProcessGroupNCCL options asking for high-priority streams: PyTorch may run a collective
    on NCCL's own stream rather than the caller's, and that stream's priority is set here."""
    options_cls = getattr(getattr(dist, "ProcessGroupNCCL", None), "Options", None)
    if options_cls is None:
        return None
    options = options_cls()
    options.is_high_priority_stream = high_priority
    # The same timeout as the group's, or init_process_group warns that one overrides the other.
    options._timeout = timeout
    return options


def init_distributed(plan: RuntimePlan, timeout_s: float, high_priority: bool = True) -> None:
    """Starts the default process group (env:// rendezvous, as torchrun sets it up), once the
    store is known to be this run's (train.rendezvous; started by `fab launch`).

    Run without torchrun (``python -m train``), this makes a one-rank group on loopback.
    """
    secret = take_secret(os.environ)
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    os.environ.setdefault("RANK", str(plan.rank))
    os.environ.setdefault("WORLD_SIZE", str(plan.world_size))
    timeout = datetime.timedelta(seconds=timeout_s)
    if plan.backend == "nccl":
        # A dead or stuck peer then aborts the communicator after the timeout instead of
        # leaving the other ranks blocked forever.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(plan.device)
    # device_id binds the NCCL communicator to this rank's GPU at init (eager, no guessing).
    device: dict[str, object] = {}
    if plan.backend == "nccl":
        device["device_id"] = plan.device
        options = nccl_options(high_priority, timeout)
        if options is not None:
            device["pg_options"] = options
    # The store env:// would make, made here so it is checked before the group uses it.
    store, rank, world_size = next(dist.rendezvous("env://", plan.rank, plan.world_size,
                                                   timeout=timeout))
    store.set_timeout(timeout)
    if secret is not None:
        verify_store(store, rank, secret,
                     f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")
    dist.init_process_group(backend=plan.backend, store=store, timeout=timeout, rank=rank,
                            world_size=world_size, **device)


_BLOCKING_WAIT_VARS = ("TORCH_NCCL_BLOCKING_WAIT", "NCCL_BLOCKING_WAIT")  # the second: old name


def blocking_wait_warning(environ: Mapping[str, str]) -> str | None:
    """The warning to print when NCCL blocking wait is on, else None.

    With it, each collective's wait blocks the CPU until the collective completes, so the
    host cannot queue the next GEMMs behind a running bucket: the overlap this loop measures
    silently disappears.
    """
    for name in _BLOCKING_WAIT_VARS:
        value = environ.get(name, "").strip().lower()
        if value in ("1", "true", "yes", "y", "on"):
            return (
                f"train: warning: {name}={environ[name]} blocks the CPU on every collective's "
                "wait, which removes the compute/communication overlap being measured; "
                f"unset {name} (timeouts still apply through TORCH_NCCL_ASYNC_ERROR_HANDLING)"
            )
    return None


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def versions() -> dict[str, str | None]:
    nccl: str | None = None
    if torch.cuda.is_available():
        try:
            raw = torch.cuda.nccl.version()
            nccl = ".".join(str(p) for p in raw) if isinstance(raw, tuple) else str(raw)
        except (AttributeError, RuntimeError):
            nccl = None
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        # torch reports RCCL's version through the same call on ROCm builds.
        "nccl" if not getattr(torch.version, "hip", None) else "rccl": nccl,
    }


def device_identity(device: torch.device) -> DeviceIdentity | None:
    """How a management library (NVML, amdsmi) can find this rank's GPU; None on CPU."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    uuid = getattr(props, "uuid", None)
    bus = None
    if all(hasattr(props, name) for name in ("pci_domain_id", "pci_bus_id", "pci_device_id")):
        bus = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    return DeviceIdentity(
        index=device.index or 0,
        uuid=str(uuid) if uuid else None,
        pci_bus_id=bus,
        is_hip=bool(getattr(torch.version, "hip", None)),
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"
