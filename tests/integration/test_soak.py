"""Long-running use leaks nothing: hooks, tensors and memory stay flat; interrupts leave no hooks."""

import gc

import pytest
import torch

from hooks import HookedLlama
from tests.helpers import tiny_hf


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _n_hooks(m) -> int:
    return sum(len(p.fwd_hooks) + len(p.bwd_hooks) for p in m.hook_dict.values())


def test_200_mixed_calls_leave_no_tensors_or_hooks():
    model = HookedLlama.from_hf(tiny_hf("gqa"))
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))

    def one_round(i: int) -> None:
        kind = i % 4
        if kind == 0:
            _, cache = model.run_with_cache(ids)
            del cache
        elif kind == 1:
            model.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_pattern", lambda t, h: t * 1.0)])
        elif kind == 2:
            with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda t, h: None)]):
                model.generate(ids[:1], max_new_tokens=4, stop_at_eos=False)
        else:
            with torch.no_grad():
                model(ids, return_type="loss")

    for i in range(20):  # warm-up: lazily built state settles
        one_round(i)
    before = _live_tensors()
    for i in range(200):
        one_round(i)
    after = _live_tensors()
    assert _n_hooks(model) == 0
    assert after - before <= 2, f"live tensors grew from {before} to {after}"


def test_keyboard_interrupt_during_generation_leaves_no_hooks(tiny):
    calls = {"n": 0}

    def interrupt_at_third_step(t, hook):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with tiny.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", interrupt_at_third_step)]):
            tiny.generate(torch.randint(3, 128, (1, 4)), max_new_tokens=10, stop_at_eos=False)
    assert calls["n"] == 3
    assert _n_hooks(tiny) == 0
    assert tiny.ctx.positions is None  # the run context was reset too
