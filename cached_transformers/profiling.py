"""Parameter and FLOP counting with ``torch.utils.flop_counter`` (a real operator-level counter).

torch's counter does not count the CPU flash-attention kernel that ``scaled_dot_product_attention``
dispatches to on CPU; :func:`count_macs` adds it (and its backward), so CPU and GPU counts agree.
FLOPs in the paper's tables are multiply-accumulates (MACs); :func:`count_macs` returns MACs.
"""
from __future__ import annotations

import time
from typing import Callable, Hashable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

_aten = torch.ops.aten


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)  # shapes, as the counter passes them


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _pair_conv_flops(grid, weight, bias=None, *args, out_shape=None, **kwargs) -> int:
    """The GRC positional conv's custom op (grc/posconv.py): the grouped conv's 2 x 9 MACs per output."""
    b, c, h, w = grid
    return 2 * b * c * h * w * weight[1] * weight[2] * weight[3]


def _pair_conv_backward_flops(grad, grid, weight, *args, out_shape=None, **kwargs) -> int:
    return 2 * _pair_conv_flops(grid, weight)  # input and weight gradients


def _mix_pos_flops(s, m, alpha, x, weight, bias, grid_h, grid_w, *args, out_shape=None, **kwargs) -> int:
    """The fused output (grc/output.py): the positional conv's MACs (the mix is elementwise, like the baseline's adds)."""
    return _pair_conv_flops((s[0], s[2], grid_h, grid_w), weight)


def _mix_pos_backward_flops(grad, s, m, alpha, x, weight, grid_h, grid_w, *args, out_shape=None, **kwargs) -> int:
    return 2 * _mix_pos_flops(s, m, alpha, x, weight, None, grid_h, grid_w)


def _gated_update_flops(z, prev, wc, *args, out_shape=None, **kwargs) -> int:
    """The fused gated update (grc/update.py): its one GEMM, (B T_m x D_m) by (D_m x D_m)."""
    return 2 * z[0] * z[1] * wc[0] * wc[1]


def _gated_update_backward_flops(grad, z, prev, wc, *args, out_shape=None, **kwargs) -> int:
    return 2 * _gated_update_flops(z, prev, wc)  # the input and weight gradients


from .grc import output as _output, posconv as _posconv, update as _update  # noqa: E402  (registers the custom ops)

_CUSTOM = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
    torch.ops.cached_transformers.pair_conv3x3: _pair_conv_flops,
    torch.ops.cached_transformers.pair_conv3x3_backward: _pair_conv_backward_flops,
    torch.ops.cached_transformers.mix_pos: _mix_pos_flops,
    torch.ops.cached_transformers.mix_pos_backward: _mix_pos_backward_flops,
    torch.ops.cached_transformers.gated_update: _gated_update_flops,
    torch.ops.cached_transformers.gated_update_backward: _gated_update_backward_flops,
}


def keep_freed_memory() -> bool:
    """Make this process's glibc malloc keep the memory it frees (for timing on CPU); False where it cannot.

    By default glibc serves blocks above a threshold (at most 32 MiB) with fresh ``mmap`` pages and
    returns the top of its heap to the system when enough of it is free, so a training step that
    allocates the same activations again faults their pages in again: every step pays the kernel for
    page faults that the GEMMs and elementwise kernels being timed do not need. On this project's VM a
    fault cost up to about 15 us and the faults of one PVT-Tiny training step (batch 8) about 200 ms of
    system time, more for the cached model than for its baseline and its floor (docs/library.md). This turns both
    off (``M_MMAP_MAX`` 0, ``M_TRIM_THRESHOLD`` at its maximum), so freed memory is reused without
    faults, as jemalloc or tcmalloc (PyTorch's CPU tuning advice) would. Process-wide and permanent:
    call it at the start of a benchmark, not inside a library or a training run.
    """
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_trim_threshold, 2 ** 31 - 1)) and bool(mallopt(m_mmap_max, 0))


def interleaved_times(fns: dict[Hashable, Callable[[], object]], warmup: int, iters: int,
                      device: torch.device | None = None) -> dict[Hashable, list[float]]:
    """Seconds of each call of each function, the functions timed in turn (rotating order), round by round.

    Interleaving puts every variant under the same machine conditions: on a shared or throttling
    machine, timing one variant after the other lets drift between the two runs enter the ratio.
    Entry ``i`` of every list comes from round ``i``, so differences can be paired by round. On a CUDA
    ``device`` each call is synchronised before its time is taken.
    """
    def sync() -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync()
    times: dict[Hashable, list[float]] = {name: [] for name in names}
    for i in range(max(1, iters)):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as the GRC cache are not parameters)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one eval forward of ``model`` on ``inputs`` (B x ...), per whole batch."""
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
            model(inputs)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def _floor_forward(self, x: torch.Tensor, H: int | None = None, W: int | None = None, *,
                   key_padding_mask: torch.Tensor | None = None, **host_kwargs) -> torch.Tensor:
    """GRCAttention.forward with only its matrix products and attention calls, on the same shapes."""
    b, t, d = x.shape
    dm, h = self.mem_dim, self.num_heads
    s, source, xu = self._self_branch(x, H, W, key_padding_mask, host_kwargs)
    z = self._gate_logits(self.cache, xu)                                  # the layer's gate GEMM
    new = torch.nn.functional.linear(z[..., :dm], self.cand.weight[:, self._columns()[0]])  # reset-side GEMM
    query = x[..., :dm] if self.config.mem_query == "input" else source[..., :dm]
    m = self.mem_attn(query, kv=new, kv_hw=self.cache_grid)
    out = s.clone()  # the one pass any mix needs
    out.view(b, t, h, d // h)[..., : dm // h].add_(m.view(b, t, h, dm // h))
    return out


def mac_floor_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose GRC layers run only their GEMMs and attention calls.

    Each GRC layer keeps its host attention, its memory attention and the gate and candidate
    GEMMs on the same shapes, and drops everything else: gate nonlinearities, LayerNorm, the gated
    update, the lambda mix (one copy and one add remain) and the positional conv (under 2% of the
    layer's MACs). The cache is not updated.
    Timing this copy against the baseline gives the lowest time ratio any implementation of the layer
    could reach with the machine's GEMM and attention kernels (``scripts/benchmark.py --floor``).
    The copy computes nonsense; it exists to be timed.
    """
    import copy
    import types

    from .grc.layer import GRCAttention

    floor = copy.deepcopy(model)
    for module in floor.modules():
        if isinstance(module, GRCAttention):
            module.forward = types.MethodType(_floor_forward, module)
    return floor
