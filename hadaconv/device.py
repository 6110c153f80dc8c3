"""The ``--device`` and ``--dtype`` choices of the model commands, resolved once.

``--device``: ``cpu``, ``cuda`` or ``cuda:N``; by default a GPU when one is present (the current
CUDA device), else the CPU.  ``--dtype``: ``auto`` keeps the checkpoint's own dtype (a bfloat16
checkpoint stays bfloat16; GGUF files are dequantized to float32), or one of ``float32``,
``bfloat16``, ``float16``.  :func:`native_bf16` says whether a device multiplies bfloat16
matrices in hardware, where autocasting to it is worth it.
"""

from __future__ import annotations

import torch

from hadaconv.errors import InputError, option

__all__ = ["DTYPES", "cast_floating", "native_bf16", "resolve_device", "resolve_dtype", "upcast_on_cpu"]

#: CPU flags (Linux ``/proc/cpuinfo``) of bfloat16 dot-product instructions: Intel AMX tiles
#: (Sapphire Rapids on) and AVX512_BF16 (Cooper Lake, AMD Zen 4 on).  Without them oneDNN
#: emulates bfloat16 and autocast is slower than float32.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = "/proc/cpuinfo"

#: The ``--dtype`` names and what they mean (None: the checkpoint's own).
DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_device(spec: str | torch.device | None = None, name: str = "device") -> torch.device:
    """The torch device for ``spec`` (None: the current GPU if CUDA is available, else the CPU);
    ``name`` is the option as error messages give it (``stats_device`` has no command-line flag).

    Raises:
        InputError: an unknown device name, or CUDA asked for where there is none.
    """
    if spec is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise InputError(f"{option(name, spec)}: not a device (expected cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{option(name, spec)}: CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"{option(name, spec)}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise InputError(f"{option(name, spec)}: only cpu, cuda and cuda:N are supported")
    return dev


def resolve_dtype(spec: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype for ``spec`` (None or "auto": None, the checkpoint's own).

    Raises:
        InputError: a name not in :data:`DTYPES`.
    """
    if spec is None or isinstance(spec, torch.dtype):
        return spec
    if spec not in DTYPES:
        raise InputError(f"{option('dtype', spec)}: choose one of {', '.join(DTYPES)}")
    return DTYPES[spec]


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: a CUDA GPU that supports
    bfloat16, or a CPU whose flags (Linux ``/proc/cpuinfo``) list one of ``BF16_CPU_FLAGS``.
    False where that cannot be read (other systems).

    Measured on a 2-core Xeon with AMX (benchmarks/RESULTS.md, "Distillation with bfloat16
    autocast on the CPU"): a distillation step of SmolLM2-135M in 3.8 s instead of 5.8 s.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def upcast_on_cpu(model: torch.nn.Module) -> torch.dtype | None:
    """Convert a bfloat16 / float16 model on the CPU to float32 in place, and return the dtype it
    had (to restore); None, and nothing done, for any other model.  CPU half-precision products
    are slow (a bfloat16 GEMM measured 7x slower than float32 on this project's CPU), and the
    sample cache keys text by the weights as they run: convert and sample must run the same."""
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    if first is None or first.dtype not in (torch.bfloat16, torch.float16) or first.device.type != "cpu":
        return None
    stored = first.dtype  # before the conversion, which replaces the parameters' data
    cast_floating(model, torch.float32)
    return stored


def cast_floating(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model``'s floating-point parameters and buffers to ``dtype`` in place, as
    ``Module.float()`` / ``.half()`` do: complex buffers (rotary tables) and integer ones are
    kept, where ``.to(dtype)`` would drop a complex buffer's imaginary part.  torch's own method,
    not the model's: transformers refuses ``.float()`` on a model it marks quantized, as it marks
    one loaded from GGUF (whose weights it has dequantized to float tensors)."""
    torch.nn.Module._apply(model, lambda t: t.to(dtype) if t.is_floating_point() else t)
