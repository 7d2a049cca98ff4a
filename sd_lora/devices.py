"""Device backends: cpu, cuda and Enflame gcu behind one small interface.

The trainer asks a `Backend` for everything device-specific (availability, the torch.device of a
local rank, autocast, grad-scaler need, seeding, synchronize, peak memory, the process-group
backend and visible-devices variable, capability facts); no `torch.cuda.*` or `torch.gcu.*` call
lives anywhere else in the project. This module knows nothing about diffusion.

torch_gcu (Enflame's, not on PyPI) is imported in exactly one guarded function, `_torch_gcu()`, so
cpu and cuda runs never touch it. What is known of its API is in ../shared/gcu.md: version 2.x is a
PrivateUse1 backend named "gcu" with a `torch.gcu` namespace mirroring `torch.cuda`; the XLA-style
1.x is refused.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import resource
import sys
import time
from dataclasses import dataclass

import torch

from sd_lora.errors import UserError

log = logging.getLogger(__name__)

TOPSRIDER_HINT = (
    "install Enflame's TopsRider software stack (torch_gcu 2.x, which registers torch.gcu), "
    "or pick another device: device=cuda or device=cpu"
)


class HostMark:
    """A point in time on a device that works in step with the host (the CPU)."""

    def __init__(self):
        self.t = time.perf_counter()

    def seconds_since(self, earlier: "HostMark") -> float:
        return self.t - earlier.t


class EventMark:
    """A point on the device's current stream, as a timing event: recording it does not wait for the device.

    seconds_since waits until the device has passed this mark; call it where the loop syncs anyway.
    """

    def __init__(self, event_type):
        self.event = event_type(enable_timing=True)
        self.event.record()

    def seconds_since(self, earlier: "EventMark") -> float:
        self.event.synchronize()
        return earlier.event.elapsed_time(self.event) / 1000.0


@contextlib.contextmanager
def kernel_flags_kept():
    """Put back the process-wide kernel switches a run may set (trainer.kernel_autotune: cudnn.benchmark;
    trainer.allow_tf32: the TF32 flags), so that the next job of an in-process sweep starts clean."""
    flags = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        yield
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = flags


@dataclass(frozen=True)
class Capabilities:
    bf16: bool  # bf16 autocast and storage are supported
    fp16: bool  # fp16 mixed precision (autocast + grad scaler) is supported
    fused_optimizer: bool  # torch.optim.AdamW(fused=True) runs on this device
    compile: bool  # torch.compile is expected to work


class Backend:
    """One device type. Subclasses answer for cpu, cuda and gcu."""

    name: str = ""
    dist_backend: str = "gloo"  # torch.distributed process-group backend
    visible_devices_env: str | None = None  # variable that masks devices for a process

    def is_available(self) -> bool:
        raise NotImplementedError

    def device_count(self) -> int:
        return 1

    def device(self, local_rank: int = 0) -> torch.device:
        raise NotImplementedError

    def capabilities(self) -> Capabilities:
        raise NotImplementedError

    def autocast(self, dtype: torch.dtype | None):
        """Context for mixed-precision forward passes; `None` = full precision."""
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.name, dtype=dtype)

    def needs_grad_scaler(self, dtype: torch.dtype | None) -> bool:
        return dtype == torch.float16

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def synchronize(self) -> None:
        pass

    def reset_peak_memory(self) -> None:
        pass

    def step_mark(self) -> HostMark | EventMark | None:
        """A mark between two training steps, for per-step times without a host sync; None: not measurable."""
        return HostMark()

    def max_memory_allocated(self) -> int:
        """Peak bytes since the last reset (cpu: the process's peak resident set size)."""
        raise NotImplementedError

    def fp8_matmul_missing(self) -> str | None:
        """Why float8 matmuls (torch._scaled_mm, model.base_precision=fp8) cannot run here; None: they can."""
        return f"float8 matmuls are not known to work on {self.name}"

    def device_name(self) -> str:
        return self.name

    def enable_tf32(self) -> None:
        """Allow TF32 matmuls where the device has them (CUDA Ampere and later)."""

    def enable_kernel_autotune(self) -> bool:
        """Time the convolution algorithms once per shape and keep the fastest; False where the device has no such switch."""
        return False

    def before_accelerate(self) -> None:
        """What the process needs before accelerate's first state object (PartialState, Accelerator)."""

    def check(self, mixed_precision: str) -> None:
        """Raise UserError if this backend cannot run here with this precision."""
        if not self.is_available():
            raise UserError(self.unavailable_message())
        caps = self.capabilities()
        if mixed_precision == "bf16" and not caps.bf16:
            raise UserError(
                f"precision=bf16: the {self.name} device ({self.device_name()}) reports no bf16 support; "
                "use precision=fp16 or precision=fp32"
            )
        if mixed_precision == "fp16" and not caps.fp16:
            raise UserError(
                f"precision=fp16 is not supported on device={self.name} (no fp16 autocast/grad scaling there); "
                "use precision=bf16 or precision=fp32 on the CPU, or device=cuda / device=gcu"
            )

    def unavailable_message(self) -> str:
        return f"device={self.name} is not available on this machine"

    def accelerator_kwargs(self) -> dict:
        """Extra `accelerate.Accelerator` arguments for this backend."""
        return {}


class CpuBackend(Backend):
    name = "cpu"
    dist_backend = "gloo"

    def is_available(self) -> bool:
        return True

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device("cpu")

    def capabilities(self) -> Capabilities:
        return Capabilities(bf16=True, fp16=False, fused_optimizer=True, compile=True)

    def max_memory_allocated(self) -> int:
        # ru_maxrss is KiB on Linux, bytes on macOS; it cannot be reset, so it is the process's peak.
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def accelerator_kwargs(self) -> dict:
        return {"cpu": True}

    def fp8_matmul_missing(self) -> str | None:
        return None  # torch's CPU _scaled_mm (per-tensor scales; slow, but the real arithmetic)


class CudaBackend(Backend):
    name = "cuda"
    dist_backend = "nccl"
    visible_devices_env = "CUDA_VISIBLE_DEVICES"

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device("cuda", local_rank)

    def capabilities(self) -> Capabilities:
        return Capabilities(bf16=torch.cuda.is_bf16_supported(), fp16=True, fused_optimizer=True, compile=True)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def step_mark(self) -> EventMark:
        return EventMark(torch.cuda.Event)

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats()

    def max_memory_allocated(self) -> int:
        return torch.cuda.max_memory_allocated()

    def device_name(self) -> str:
        return torch.cuda.get_device_name()

    def fp8_matmul_missing(self) -> str | None:
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) >= (8, 9):
            return None
        return (f"{self.device_name()} has compute capability {major}.{minor}, and float8 tensor cores start at 8.9 "
                "(Ada: L4, L40, RTX 40xx; Hopper: H100, H200)")

    def enable_tf32(self) -> None:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def enable_kernel_autotune(self) -> bool:
        torch.backends.cudnn.benchmark = True
        return True

    def unavailable_message(self) -> str:
        return (
            "device=cuda but torch sees no CUDA device "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
            "install a CUDA build of torch on a GPU machine, or use device=auto / device=cpu"
        )


def _torch_gcu():
    """Import torch_gcu 2.x, the only place it is imported. Raises UserError for missing or 1.x."""
    try:
        module = importlib.import_module("torch_gcu")
    except ImportError as exc:
        raise UserError(f"device=gcu needs torch_gcu, which is not importable here ({exc}); {TOPSRIDER_HINT}") from None
    if not hasattr(torch, "gcu"):
        if hasattr(module, "gcu_device"):
            found = "the legacy torch_gcu 1.x (XLA-style, torch_gcu.gcu_device)"
        else:
            found = "a torch_gcu that registers no torch.gcu namespace"
        version = getattr(module, "__version__", "unknown version")
        raise UserError(
            f"device=gcu found {found}, version {version}, with torch {torch.__version__}; "
            f"this project needs torch_gcu 2.x (PrivateUse1 'gcu' device): {TOPSRIDER_HINT}"
        )
    return module


class GcuBackend(Backend):
    """Enflame GCU through torch_gcu 2.x (TopsRider 3.x)."""

    name = "gcu"
    dist_backend = "eccl"
    visible_devices_env = "TOPS_VISIBLE_DEVICES"

    def __init__(self, transfer_to_gcu: bool = False):
        self.transfer_to_gcu = transfer_to_gcu
        self._module = None

    @property
    def gcu(self):
        """The `torch.gcu` namespace (importing torch_gcu on first use)."""
        if self._module is None:
            self._module = _torch_gcu()
        return torch.gcu

    def is_available(self) -> bool:
        try:
            return bool(self.gcu.is_available())
        except UserError:
            return False

    def check(self, mixed_precision: str) -> None:
        self.gcu  # missing or 1.x torch_gcu: its own message, before "not available"
        super().check(mixed_precision)
        if not self.transfer_to_gcu:
            raise UserError(
                "device=gcu with device.transfer_to_gcu=false: upstream accelerate has no GCU device type, so the "
                "trainer needs torch_gcu.transfer_to_gcu to run accelerate's CUDA path on the GCU; "
                "set device.transfer_to_gcu=true (the gcu option's default)"
            )

    def device_count(self) -> int:
        return self.gcu.device_count()

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device("gcu", local_rank)

    def capabilities(self) -> Capabilities:
        return Capabilities(bf16=bool(self.gcu.is_bf16_supported()), fp16=True, fused_optimizer=False, compile=False)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.gcu.manual_seed_all(seed)

    def synchronize(self) -> None:
        self.gcu.synchronize()

    def step_mark(self) -> EventMark | None:
        # torch.gcu.Event is not in the calls ../shared/gcu.md lists as known; per-step times only if it exists
        event = getattr(self.gcu, "Event", None)
        return None if event is None else EventMark(event)

    def reset_peak_memory(self) -> None:
        self.gcu.reset_peak_memory_stats()

    def max_memory_allocated(self) -> int:
        return self.gcu.max_memory_allocated()

    def device_name(self) -> str:
        return self.gcu.get_device_name()

    def fp8_matmul_missing(self) -> str | None:
        return "torch_gcu's float8 matmuls are not known (../shared/gcu.md lists no torch._scaled_mm)"

    def unavailable_message(self) -> str:
        return (
            "device=gcu: torch_gcu 2.x is installed but torch.gcu.is_available() is False "
            f"(TOPS_VISIBLE_DEVICES={os.environ.get('TOPS_VISIBLE_DEVICES', 'unset')}); "
            "check the GCU driver and TOPS_VISIBLE_DEVICES, or use device=cpu"
        )

    def before_accelerate(self) -> None:
        if self.transfer_to_gcu:
            self.enable_transfer_to_gcu()

    def enable_transfer_to_gcu(self):
        """Redirect torch.cuda / nccl to GCU so that accelerate's CUDA code path drives the GCU."""
        self.gcu
        module = importlib.import_module("torch_gcu.transfer_to_gcu")
        log.info("device=gcu: torch_gcu.transfer_to_gcu is on; accelerate runs its CUDA path on the GCU "
                 "(torch.cuda -> torch.gcu, nccl -> eccl)")
        return module


def torch_gcu_version() -> str | None:
    """torch_gcu's version for a run's provenance, None if it is not installed. Reads package metadata
    only: importing torch_gcu initialises the GCU runtime, which a cpu or cuda run must not do."""
    from importlib import metadata, util

    try:
        return metadata.version("torch_gcu")
    except metadata.PackageNotFoundError:
        return "installed (no version metadata)" if util.find_spec("torch_gcu") is not None else None


def gcu_present() -> bool:
    """torch_gcu 2.x importable and reporting a device (used by device=auto); never raises."""
    try:
        importlib.import_module("torch_gcu")
    except ImportError:
        return False
    return hasattr(torch, "gcu") and bool(torch.gcu.is_available())


def build_backend(device_type: str, transfer_to_gcu: bool = True) -> Backend:
    """`device.type` -> Backend; `auto` picks cuda, then gcu, then cpu."""
    if device_type == "auto":
        if torch.cuda.is_available():
            device_type = "cuda"
        elif gcu_present():
            device_type = "gcu"
        else:
            device_type = "cpu"
        log.info("device=auto chose %s", device_type)
    if device_type == "cpu":
        return CpuBackend()
    if device_type == "cuda":
        return CudaBackend()
    if device_type == "gcu":
        return GcuBackend(transfer_to_gcu=transfer_to_gcu)
    raise UserError(f"device.type={device_type!r} is unknown; use one of auto, cpu, cuda, gcu")
