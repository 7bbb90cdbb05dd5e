"""The engine's device: which one and in what dtype, synchronisation, memory, and how it is described."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Device:
    torch_device: torch.device
    dtype: torch.dtype

    @property
    def is_cuda(self) -> bool:
        return self.torch_device.type == "cuda"

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.torch_device)

    def release_memory(self) -> None:
        if self.is_cuda:
            torch.cuda.empty_cache()

    def reset_peak_memory(self) -> None:
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.torch_device)

    def peak_memory_gib(self) -> float | None:
        if not self.is_cuda:
            return None
        return round(torch.cuda.max_memory_allocated(self.torch_device) / 2**30, 3)

    def memory_bytes(self) -> dict[str, int] | None:
        """GPU memory in bytes held by tensors (allocated), by the caching allocator (reserved), and the peak
        allocated since start or the last ``reset_peak_memory``; None on a CPU (there is no device memory)."""
        if not self.is_cuda:
            return None
        return {
            "allocated": torch.cuda.memory_allocated(self.torch_device),
            "reserved": torch.cuda.memory_reserved(self.torch_device),
            "peak": torch.cuda.max_memory_allocated(self.torch_device),
        }

    def free_memory_bytes(self) -> int:
        """Free GPU memory now (what the memory plan may use by default)."""
        return torch.cuda.mem_get_info(self.torch_device)[0]

    def capability(self) -> tuple[int, int] | None:
        return torch.cuda.get_device_capability(self.torch_device) if self.is_cuda else None

    def for_stack(self):
        """What the optimizations' ``decide`` sees of this device."""
        from flux_kontext.stack import Hardware

        name = torch.cuda.get_device_name(self.torch_device) if self.is_cuda else None
        return Hardware(self.torch_device.type, self.capability(), name)

    def describe(self) -> dict:
        info = {"type": self.torch_device.type, "dtype": str(self.dtype).removeprefix("torch.")}
        if self.is_cuda:
            props = torch.cuda.get_device_properties(self.torch_device)
            info.update(
                name=props.name,
                capability=f"sm_{props.major}{props.minor}",
                memory_gib=round(props.total_memory / 2**30, 1),
            )
        else:
            info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
        return info

    def software_versions(self) -> dict:
        import diffusers
        import transformers

        versions = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        }
        if self.is_cuda:
            versions["cuda"] = torch.version.cuda
        return versions


def resolve_device(name: str) -> torch.device:
    """'auto' is cuda when available, else cpu; an unavailable cuda is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"FLUX_DEVICE={name} but no CUDA device is available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on cuda, fp32 on cpu."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def is_sticky_gpu_error(exc: BaseException) -> bool:
    """An error after which every later CUDA call fails too (illegal access, device-side assert)."""
    accelerator_error = getattr(torch, "AcceleratorError", ())
    text = str(exc)
    return isinstance(exc, accelerator_error) or "CUDA error" in text or "device-side assert" in text


def seconds_since_process_start() -> float | None:
    """How long this process has run (imports included), from the kernel's record of its start; None off Linux."""
    try:
        with open("/proc/self/stat") as stat:
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as uptime:
            up = float(uptime.read().split()[0])
        return max(0.0, up - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None
