"""Whether a reduced precision is really faster here: a measured probe, not a guess from the CPU's name.

On a CPU without native bf16 (no AVX512-BF16 / AMX) torch emulates bf16 and a bf16 model runs about 5x slower
than fp32; on one with it (this project's build machine today: AVX512-BF16) a bf16 ViT-B-32 runs 2x faster.
`faster_than_fp32(device, dtype)` times a small Transformer-shaped block (linear, GELU, linear, LayerNorm) in
each precision, a few milliseconds once per process and device, so that loading and training fall back to fp32
and say why instead of silently running slower.
"""

from __future__ import annotations

import functools
import time

import torch

PROBE_SIZE = 256
MIN_SPEEDUP = 1.0  # a reduced precision is kept only when it is at least as fast as fp32


def _block(dim: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim), torch.nn.LayerNorm(dim)
    )


@torch.no_grad()
def _best_time(block: torch.nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        block(x).float().sum().item()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def matmul_speedup(device_type: str, dtype: torch.dtype) -> float:
    """fp32 time / `dtype` time of a Transformer-shaped block on this kind of device (>1: faster)."""
    if device_type == "cuda" and not torch.cuda.is_available():
        return 0.0
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_SIZE, PROBE_SIZE, generator=gen).to(device_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        block = _block(PROBE_SIZE).to(device_type).eval()
    try:
        low = _block(PROBE_SIZE).to(device_type, dtype).eval()
        low.load_state_dict(block.state_dict())
        _best_time(low, x.to(dtype), 1)  # warm-up
        _best_time(block, x, 1)
        return _best_time(block, x) / _best_time(low, x.to(dtype))
    except RuntimeError:  # the device has no kernel for this dtype at all
        return 0.0


def faster_than_fp32(device: torch.device | str, dtype: torch.dtype) -> bool:
    """True for fp32 itself, and for a reduced precision this device multiplies at least as fast."""
    if dtype == torch.float32:
        return True
    return matmul_speedup(torch.device(device).type, dtype) >= MIN_SPEEDUP
