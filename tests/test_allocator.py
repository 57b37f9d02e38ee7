"""gman.allocator: glibc's thresholds are set, the opt-out leaves them alone, training state made
before the first step changes nothing, and the reused buffers stay out of the heap."""
from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys

import pytest
import torch

from gman.allocator import allocate_training_state, keep_freed_memory
from gman.model.layers import release_scratch, scratch

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# In a fresh process: malloc 20 MiB, print how much that added to glibc's mmap'ed blocks (mallinfo2().hblkhd)
PROBE = """
import ctypes
from gman.allocator import keep_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
print(keep_freed_memory())
before = libc.mallinfo2().hblkhd
block = libc.malloc(20 << 20)
print(libc.mallinfo2().hblkhd - before)
"""


def test_opt_out_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv("GMAN_MALLOC_TUNING", "0")
    assert keep_freed_memory() is False


@pytest.mark.skipif(not GLIBC, reason="glibc only")
@pytest.mark.parametrize("tuning", ["1", "0"])
def test_a_20_mib_block_comes_from_the_reusable_heap_once_tuned(tuning):
    env = {**os.environ, "GMAN_MALLOC_TUNING": tuning}
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    applied, mmapped = result.stdout.split()
    assert applied == ("True" if tuning == "1" else "False")
    # glibc's default threshold starts at 128 KiB: such a block is mmap'ed and unmapped again on free
    assert (int(mmapped) == 0) == (tuning == "1"), mmapped


def _train(model, optimizer, steps: int, early_state: bool) -> None:
    if early_state:
        allocate_training_state(optimizer)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=not early_state)
        x = torch.randn(16, 5, generator=g)
        model(x).pow(2).mean().backward()
        optimizer.step()


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_early_training_state_trains_bit_for_bit_the_same(kind):
    """Adam's state made before the first step (a learning-rate-0 step, then zeroed) and
    gradients zeroed in place instead of freed: the same parameters and state, to the bit."""
    results = []
    for early in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 1))
        cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
        optimizer = cls(model.parameters(), lr=1e-2, weight_decay=0.1)  # weight decay: non-zero moments in the 0-lr step
        _train(model, optimizer, steps=3, early_state=early)
        results.append((model.state_dict(), optimizer.state_dict()["state"]))
    (plain, plain_state), (early, early_state) = results
    assert all(torch.equal(plain[k], early[k]) for k in plain)
    for i, state in plain_state.items():
        assert all(torch.equal(state[k], early_state[i][k]) for k in state)
    assert int(early_state[0]["step"]) == 3


def test_early_training_state_leaves_existing_or_unknown_state_alone():
    model = torch.nn.Linear(3, 1)
    resumed = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.ones(2, 3)).sum().backward()
    resumed.step()
    before = {k: v.clone() for k, v in resumed.state[model.weight].items()}
    assert allocate_training_state(resumed) is False
    assert all(torch.equal(before[k], resumed.state[model.weight][k]) for k in before)

    sgd = torch.optim.SGD(torch.nn.Linear(3, 1).parameters(), lr=0.1, momentum=0.9, dampening=0.5)
    assert allocate_training_state(sgd) is False
    assert not sgd.state  # a momentum buffer made early would start from 0, not from the first gradient
    assert all(p.grad is not None and not p.grad.any() for group in sgd.param_groups for p in group["params"])


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_scratch_buffers_live_outside_the_malloc_heap():
    """The lean path's reused buffers are memory maps: malloc's in-use bytes (heap + its own
    mmaps) do not grow by them, while a plain tensor of the same size does."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2

    def malloc_bytes() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    size = 16 << 20
    before = malloc_bytes()
    mapped = scratch(7, (size // 4,), torch.empty(0))
    mapped.fill_(1.0)
    grown = malloc_bytes() - before
    plain = torch.ones(size // 4)
    assert malloc_bytes() - before - grown >= size  # the probe sees an ordinary tensor
    assert grown < size // 16, grown
    assert float(mapped.sum()) == size // 4 and plain.numel() == mapped.numel()
    release_scratch()
