"""Parameter and FLOP counting with ``torch.utils.flop_counter`` (a real operator-level counter).

torch's counter does not count the CPU flash-attention kernel that ``scaled_dot_product_attention``
dispatches to on CPU; :func:`count_macs` adds it (and its backward), so CPU and GPU counts agree.
FLOPs in the paper's tables are multiply-accumulates (MACs); :func:`count_macs` returns MACs.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

_aten = torch.ops.aten


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)  # shapes, as the counter passes them


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


_CUSTOM = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


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
