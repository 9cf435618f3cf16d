"""fp32 CPU matrix products through oneDNN where torch's default (MKL) runs at half speed.

torch computes fp32 `F.linear` / `mm` on CPU with MKL. On AMD CPUs MKL takes its AVX2 code path even
where the CPU has AVX-512: on the 2-core AMD EPYC (Zen 5) development host, MKL's sgemm reaches
~95 GFLOP/s on one core and oneDNN's (`torch.ops.mkldnn._linear_pointwise`, the kernel that
`torch.compile` uses for CPU linears) 180-240 GFLOP/s for the Transformer's shapes (docs/models.md,
"Performance"). Both are fp32 with fp32 accumulation; only the summation order differs (~1e-6 relative).

`matmul_nt(a, b, bias)` = a @ b.T (+ bias) with either kernel, and `linear(x, w, b)` = `F.linear`
with an autograd function whose backward uses the same kernel. The choice is made once per process:

    SITSKIT_CPU_MATMUL=auto (default): oneDNN on AMD x86 CPUs with AVX-512, torch's default elsewhere
                                       (on Intel CPUs MKL already runs at the AVX-512 peak)
    SITSKIT_CPU_MATMUL=onednn | aten:  force one

Only fp32 CPU tensors outside autocast take the oneDNN path; everything else (CUDA, bf16 autocast,
float64) calls torch's own functions, so the path is invisible to callers.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "onednn", "aten")
_MIN_ROWS = 256  # below this the per-call overhead of oneDNN outweighs its faster kernel


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.cache
def onednn_enabled() -> bool:
    """Whether fp32 CPU matrix products go through oneDNN in this process (see the module docstring)."""
    choice = os.environ.get("SITSKIT_CPU_MATMUL", "auto").strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"SITSKIT_CPU_MATMUL must be one of {BACKENDS}, got {choice!r}")
    available = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    if choice == "aten" or not available:
        return False
    if choice == "onednn":
        return True
    return _cpu_vendor() == "AuthenticAMD" and torch.backends.cpu.get_cpu_capability() == "AVX512"


def _use_onednn(rows: int, *tensors: torch.Tensor) -> bool:
    return (rows >= _MIN_ROWS and tensors[0].device.type == "cpu" and all(t.dtype == torch.float32 for t in tensors)
            and not torch.is_autocast_enabled("cpu") and onednn_enabled())


def _dense(t: torch.Tensor) -> bool:
    """2-D, not empty, row- or column-major without gaps: what oneDNN's inner product takes as it is."""
    return t.dim() == 2 and t.numel() > 0 and (t.stride() == (t.shape[1], 1) or t.stride() == (1, t.shape[0]))


def matmul_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b.T (+ bias). a: [M, K], b: [N, K] (any strides), bias: [N] | None -> [M, N]. No autograd
    through the oneDNN path: call it under no_grad or inside an autograd function."""
    if _use_onednn(a.shape[0], a, b) and _dense(a) and _dense(b):
        try:
            return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")
        except RuntimeError as err:  # a layout or size this oneDNN build has no kernel for: torch's own
            warnings.warn(f"oneDNN could not multiply {tuple(a.shape)} (strides {a.stride()}) by "
                          f"{tuple(b.shape)}^T (strides {b.stride()}), using torch's kernel: {err}", stacklevel=2)
    return F.linear(a, b, bias)


class _LinearFunction(torch.autograd.Function):
    """y = x W^T + b on [M, K] inputs; forward and input-gradient products through `matmul_nt`."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return matmul_nt(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = matmul_nt(grad_y, weight.t()) if need_x else None  # [M, N] x [N, K]
        # the weight gradient reduces over the M rows: torch's mm (oneDNN's inner product would first copy
        # the transposed [N, M] operand)
        grad_w = grad_y.t().mm(x) if need_w else None
        grad_b = grad_y.sum(0) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x [..., K]; fp32 CPU products through oneDNN when enabled."""
    rows = x.numel() // max(x.shape[-1], 1)
    x2 = x.reshape(rows, x.shape[-1])
    if not _use_onednn(rows, x, weight):
        # always on [rows, K]: for a non-contiguous x of 3+ dims (per-pixel views of image features), under
        # CPU autocast F.linear ran a batched product with the weight copied once per leading index
        # ([136, 256, 768] per call), which made the bf16 STCLN classifier slower than the reference's
        return F.linear(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        y = _LinearFunction.apply(x2, weight, bias)
    else:
        y = matmul_nt(x2, weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])
