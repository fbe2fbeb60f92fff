"""Precision: where bf16 runs natively, what ``auto`` means, and the autocast context.

``train.amp`` (and ``--amp`` of extraction) is "auto", "none", "bf16" or "fp16"; `resolve_amp`
turns "auto" into bf16 where the device has bf16 units and float32 elsewhere.
"""

from __future__ import annotations

import contextlib

import torch

from ips.config import AMP_MODES
from ips.errors import InputError


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products in hardware: CUDA GPUs from Ampere
    on, x86 CPUs with AVX512-BF16 or AMX, Arm CPUs with BF16 instructions. Elsewhere bf16
    autocast is emulated, and on an AVX2 CPU ~9x slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu" or not hasattr(torch.cpu, "get_capabilities"):  # torch < 2.8
        return False
    caps = torch.cpu.get_capabilities()
    return any(caps.get(k, False) for k in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))


def resolve_amp(device: torch.device, amp: str) -> str:
    """The precision ``amp`` means on ``device``: "auto" is "bf16" where the device has native
    bf16 (`native_bf16`), else "none"; "none", "bf16" and "fp16" stay as they are."""
    if amp not in AMP_MODES:
        raise InputError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    if amp == "auto":
        return "bf16" if native_bf16(device) else "none"
    return amp


def precision_name(amp: str) -> str:
    """How a resolved ``amp`` reads in logs: "float32" or "bf16 autocast" / "fp16 autocast"."""
    return "float32" if amp == "none" else f"{amp} autocast"


def autocast(
    device: torch.device, amp: str, *, option: str = "train.amp"
) -> contextlib.AbstractContextManager:
    """Autocast context for ``amp`` ("auto", "none", "bf16", "fp16"; see `resolve_amp`);
    ``option`` names the setting in errors."""
    device = torch.device(device)
    amp = resolve_amp(device, amp)
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise InputError(f"{option}: fp16 needs a CUDA device; use bf16 on CPU")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
