"""The LoRA negative-index fix, against vLLM's real CPU ops (no engine)."""

import pytest

import torch
from vllm.lora.ops.torch_ops import lora_ops

from hybridserve.generation import vllm_patches


def _original(name):
    fn = getattr(lora_ops, name)
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def test_installed_vllm_has_the_bug():
    # If this fails, upstream fixed it: the patch retires itself and this
    # test (and the patch) can be deleted.
    assert vllm_patches.negative_index_is_buggy()


@pytest.mark.parametrize("name", ["bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"])
def test_fix_zeroes_no_adapter_rows_and_keeps_the_rest(name):
    torch.manual_seed(0)
    slots, n = 3, 4
    idx = torch.tensor([0, -1, 2, -1])
    if name == "bgmv_shrink":
        w = torch.randn(slots, 1, 4, 8)  # (slots, 1, rank, hidden)
        x = torch.randn(n, 8)
        make_out = lambda: torch.zeros(n, 4)
        extra = (1.0,)
    else:
        w = torch.randn(slots, 1, 8, 4)  # (slots, 1, out, rank)
        x = torch.randn(n, 4)
        make_out = lambda: torch.ones(n, 8)
        extra = (0, 8, True) if name == "bgmv_expand_slice" else (True,)
    original = _original(name)
    fixed = vllm_patches._wrap(original)

    buggy_out, fixed_out = make_out(), make_out()
    original(x, w, buggy_out, idx, *extra)
    fixed(x, w, fixed_out, idx, *extra)

    baseline = make_out()
    rows_without_adapter = idx < 0
    # The bug: rows without an adapter got the last slot's delta.
    assert not torch.equal(buggy_out[rows_without_adapter], baseline[rows_without_adapter])
    # Fixed: those rows are untouched; rows with an adapter are bit-identical.
    assert torch.equal(fixed_out[rows_without_adapter], baseline[rows_without_adapter])
    assert torch.equal(fixed_out[~rows_without_adapter], buggy_out[~rows_without_adapter])


def test_register_patches_every_binding_and_is_idempotent():
    import vllm.lora.ops.torch_ops as pkg
    from vllm.lora.punica_wrapper import punica_cpu

    vllm_patches.register()
    first = lora_ops.bgmv_shrink
    vllm_patches.register()
    for name in vllm_patches._OPS:
        for module in (lora_ops, pkg, punica_cpu):
            assert getattr(getattr(module, name), vllm_patches._MARK, False), (module, name)
    assert lora_ops.bgmv_shrink is first
