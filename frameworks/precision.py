"""Mixed-precision training ([train] precision): which precisions training here may compute in, and why
the others are refused. Read when a spec is read, so nothing here imports a framework.

Precision is how training computes; the trained model keeps float32 weights (Keras' mixed policies and
torch.autocast both keep float32 master weights), so it is exported with float32 inputs and outputs and
its own float32 outputs are the parity reference."""
from __future__ import annotations

from pathlib import Path

PRECISIONS = ("fp32", "bf16", "fp16")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instructions that compute bfloat16 natively

FP16_ON_CPU = ("fp16 mixed precision pays on a GPU's float16 units, and training here runs on the CPU, which has "
               "no float16 matmul kernels: torch computes them element by element (a 1024x1024 matmul measured "
               "150x slower in float16 than in float32 on this kind of machine), and float16 gradients need "
               "loss scaling besides; train in bf16 or fp32")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The CPU's feature flags, or None where the system does not list them."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def refusal(precision: str, flags: set[str] | None = ...) -> str | None:
    """Why training in `precision` is refused on this machine, or None when it may run."""
    if precision == "fp16":
        return FP16_ON_CPU
    if precision == "bf16":
        flags = cpu_flags() if flags is ... else flags
        if flags is not None and not flags & set(BF16_FLAGS):
            return (f"this CPU computes no bfloat16 natively (none of {', '.join(BF16_FLAGS)} among its flags), so "
                    f"every bfloat16 op is emulated through float32 and training is slower than in fp32; train in fp32")
    return None
