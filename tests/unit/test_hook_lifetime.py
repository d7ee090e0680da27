"""Hooks never outlive their context: hooks added inside a ``hooks()`` block or from a running hook,
nested blocks, and hooks of one thread never running on another thread's forward pass."""

import threading

import pytest
import torch

from hooks import HookedLlama

B, P = 2, 7
WAIT = 120  # seconds; only reached if the code under test deadlocks


@pytest.fixture
def ids():
    return torch.randint(3, 128, (B, P), generator=torch.Generator().manual_seed(0))


def n_hooks(m: HookedLlama) -> int:
    return sum(len(p.fwd_hooks) + len(p.bwd_hooks) for p in m.hook_dict.values())


def zero(t, hook):
    return torch.zeros_like(t)


def zeroed_at(m, ids, name):
    """Reference: the logits with the residual stream zeroed at ``name``, computed by splitting the forward."""
    layer = int(name.split(".")[1])
    resid = m(ids, stop_at_layer=layer)
    return m(torch.zeros_like(resid), start_at_layer=layer)


def test_add_hook_inside_a_hooks_block_ends_with_the_block(tiny, ids):
    clean = tiny(ids)
    ref = zeroed_at(tiny, ids, "blocks.1.hook_resid_pre")
    with tiny.hooks():
        tiny.add_hook("blocks.1.hook_resid_pre", zero)
        torch.testing.assert_close(tiny(ids), ref, rtol=0, atol=0)
    assert n_hooks(tiny) == 0
    torch.testing.assert_close(tiny(ids), clean, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="body failed"):
        with tiny.hooks():
            tiny.add_hook("blocks.1.hook_resid_pre", zero, "fwd")
            tiny.add_hook("blocks.1.hook_resid_pre", lambda g, h: None, "bwd")
            raise RuntimeError("body failed")
    assert n_hooks(tiny) == 0


def test_nested_blocks_each_remove_their_own_hooks(tiny, ids):
    seen = []
    with tiny.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda t, h: seen.append("outer"))]):
        with tiny.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda t, h: seen.append("inner"))]):
            tiny.add_hook("blocks.1.hook_resid_post", lambda t, h: seen.append("inner add_hook"))
            tiny(ids)
            assert n_hooks(tiny) == 3
        assert n_hooks(tiny) == 1
        tiny(ids)
    assert n_hooks(tiny) == 0
    assert seen == ["outer", "inner", "inner add_hook", "outer"]


def test_a_hook_added_from_a_running_hook_ends_with_that_forward_pass(tiny, ids):
    ref = zeroed_at(tiny, ids, "blocks.2.hook_resid_pre")
    clean = tiny(ids)

    def adder(t, hook):
        tiny.add_hook("blocks.2.hook_resid_pre", zero)

    # from a hook of a hooks() block, and from a hook the model holds (added outside any block)
    torch.testing.assert_close(
        tiny.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_pre", adder)]), ref, rtol=0, atol=0
    )
    assert n_hooks(tiny) == 0
    handle = tiny.add_hook("blocks.0.hook_resid_pre", adder)
    torch.testing.assert_close(tiny(ids), ref, rtol=0, atol=0)
    assert n_hooks(tiny) == 1  # the adder stays (the model's), what it added is gone
    handle.remove()
    torch.testing.assert_close(tiny(ids), clean, rtol=0, atol=0)

    # a forward pass that fails after the hook was added leaves nothing either
    def adder_then_fail(t, hook):
        tiny.add_hook("blocks.2.hook_resid_pre", zero)
        raise ValueError("hook failed")

    with pytest.raises(ValueError, match="hook failed"):
        tiny.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_pre", adder_then_fail)])
    assert n_hooks(tiny) == 0


def test_a_hook_removed_by_an_earlier_hook_at_the_same_point_does_not_run(tiny, ids):
    ran, later = [], {}
    first = tiny.add_hook("blocks.0.hook_resid_pre", lambda t, h: later["second"].remove())
    later["second"] = tiny.add_hook("blocks.0.hook_resid_pre", lambda t, h: ran.append("second"))
    tiny(ids)
    first.remove()
    assert ran == [] and n_hooks(tiny) == 0


class Thread(threading.Thread):
    """A thread that re-raises its exception in join()."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.error, self.result = fn, None, None

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self.error = exc

    def join(self, timeout=WAIT):
        super().join(timeout)
        assert not self.is_alive(), "thread did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def test_hooks_of_a_block_run_only_on_its_own_thread(tiny, ids):
    """Thread A stops inside its own forward pass (inside a hook of its block) while thread B runs a
    whole forward pass, a cache and a block of its own; each sees only its own hooks and positions."""
    other = torch.randint(3, 128, (1, 4), generator=torch.Generator().manual_seed(1))
    clean_ids, clean_other = tiny(ids), tiny(other)
    ref_a = zeroed_at(tiny, ids, "blocks.1.hook_resid_pre")
    ref_b = zeroed_at(tiny, other, "blocks.2.hook_resid_pre")
    _, cache_other = tiny.run_with_cache(other, names_filter="blocks.1.hook_resid_post")
    a_inside, b_done = threading.Event(), threading.Event()
    a_positions = []

    def a_hook(t, hook):
        a_inside.set()
        assert b_done.wait(WAIT)
        a_positions.append(hook.positions.clone())  # still A's positions after B's passes
        return torch.zeros_like(t)

    def thread_a():
        with tiny.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", a_hook)]):
            return tiny(ids)

    def thread_b():
        assert a_inside.wait(WAIT)
        try:
            plain = tiny(other)  # A's block is open and A's pass is in flight
            logits, cache = tiny.run_with_cache(other, names_filter="blocks.1.hook_resid_post")
            with tiny.hooks(fwd_hooks=[("blocks.2.hook_resid_pre", zero)]):
                own = tiny(other)
            return plain, logits, cache["blocks.1.hook_resid_post"], own
        finally:
            b_done.set()

    a, b = Thread(thread_a), Thread(thread_b)
    a.start(), b.start()
    plain, logits, cached, own = b.join()
    out_a = a.join()
    torch.testing.assert_close(plain, clean_other, rtol=0, atol=0)
    torch.testing.assert_close(logits, clean_other, rtol=0, atol=0)
    torch.testing.assert_close(cached, cache_other["blocks.1.hook_resid_post"], rtol=0, atol=0)
    torch.testing.assert_close(own, ref_b, rtol=0, atol=0)
    torch.testing.assert_close(out_a, ref_a, rtol=0, atol=0)
    assert torch.equal(a_positions[0], torch.arange(P).expand(B, P))
    assert n_hooks(tiny) == 0
    torch.testing.assert_close(tiny(ids), clean_ids, rtol=0, atol=0)


def test_hooks_the_model_holds_run_on_every_thread(tiny, ids):
    ref = zeroed_at(tiny, ids, "blocks.1.hook_resid_pre")
    handle = tiny.add_hook("blocks.1.hook_resid_pre", zero)  # outside any block: the model's
    try:
        out = Thread(lambda: tiny(ids))
        out.start()
        torch.testing.assert_close(out.join(), ref, rtol=0, atol=0)
    finally:
        handle.remove()
    assert n_hooks(tiny) == 0


def test_empty_nested_blocks_keep_track_of_which_is_open(tiny, ids):
    with tiny.hooks():
        with tiny.hooks():
            pass
        tiny.add_hook("blocks.0.hook_resid_pre", zero)  # belongs to the outer block
        assert n_hooks(tiny) == 1
    assert n_hooks(tiny) == 0


def test_blocks_closed_out_of_order_still_remove_exactly_their_hooks(tiny, ids):
    """Two blocks entered and exited like two steering contexts closed in the order they were opened."""
    first, second = tiny.hooks(), tiny.hooks()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the outer one closes first: nothing of it was left to remove
    tiny.add_hook("blocks.0.hook_resid_pre", zero)  # belongs to the block still open
    assert n_hooks(tiny) == 1
    second.__exit__(None, None, None)
    assert n_hooks(tiny) == 0
    tiny.add_hook("blocks.0.hook_resid_pre", zero).remove()  # outside any block again: the model's
    assert n_hooks(tiny) == 0
