"""The batch-size search with fake steps that run out of memory above a threshold (every way
PyTorch says so), a real CPU allocator failure, state put back, and a real CUDA run."""
import gc
import math
import weakref
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from minicnn import batch_size
from minicnn.batch_size import find_batch_size, is_out_of_memory
from minicnn.models import simple_resnet

OOM_ERRORS = {
    "torch.OutOfMemoryError": lambda: torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 7.79 GiB"),
    "CPU allocator": lambda: RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
        "you tried to allocate 137438953472 bytes. Error code 12 (Cannot allocate memory)"),
    "CPU allocator, Windows": lambda: RuntimeError(
        "[enforce fail at C:\\actions-runner\\_work\\pytorch\\pytorch\\c10\\core\\impl\\alloc_cpu.cpp:72] "
        "data. DefaultCPUAllocator: not enough memory: you tried to allocate 11520000 bytes."),
    "MPS allocator": lambda: RuntimeError(
        "MPS backend out of memory (MPS allocated: 17.50 GB, other allocations: 1.20 GB, max "
        "allowed: 18.13 GB). Tried to allocate 256.00 MB on private pool."),
    "MemoryError": lambda: MemoryError(),
}


def fake_step(threshold, error, tried=None):
    """try_step that fits up to `threshold` and raises `error()` above it."""
    def try_step(batch_size):
        if tried is not None:
            tried.append(batch_size)
        if batch_size > threshold:
            raise error()
    return try_step


def expected(threshold, limit, margin):
    return limit if threshold >= limit else min(limit, max(1, math.floor(margin * threshold)))


@pytest.mark.parametrize("kind", OOM_ERRORS)
def test_finds_the_threshold_then_applies_the_margin_for_every_kind_of_oom(kind):
    tried = []
    found = find_batch_size(fake_step(100, OOM_ERRORS[kind], tried), limit=60_000)
    assert found == 90  # floor(0.9 * 100)
    assert tried == [2, 4, 8, 16, 32, 64, 128, 96, 112, 104, 100, 102, 101]  # doubling, then bisection


@given(threshold=st.integers(1, 5000), start=st.integers(1, 8), limit=st.integers(8, 6000),
       margin=st.sampled_from([0.5, 0.8, 0.9, 0.95, 1.0]), kind=st.sampled_from(sorted(OOM_ERRORS)))
def test_search_property(threshold, start, limit, margin, kind):
    # gc.collect() after each fake OOM costs ~0.1 s with torch loaded; freeing is tested below
    with patch.object(batch_size, "_free_memory", lambda device: None):
        search_property(threshold, start, limit, margin, kind)


def search_property(threshold, start, limit, margin, kind):
    tried = []
    try_step = fake_step(threshold, OOM_ERRORS[kind], tried)
    if threshold < start:
        with pytest.raises(MemoryError, match=f"start={start} does not fit"):
            find_batch_size(try_step, start=start, limit=limit, margin=margin)
        return
    found = find_batch_size(try_step, start=start, limit=limit, margin=margin)
    assert found == expected(threshold, limit, margin)
    assert max(tried) <= limit  # never tries more than the dataset
    assert len(tried) <= 2 * math.log2(limit) + 3  # doubling + bisection, not a linear scan


def test_the_limit_caps_the_result_and_no_margin_when_the_whole_dataset_fits():
    tried = []
    assert find_batch_size(fake_step(10**9, MemoryError, tried), limit=1000) == 1000
    assert tried[-2:] == [512, 1000]
    assert find_batch_size(fake_step(999, MemoryError), limit=1000) == 899


def test_when_even_start_does_not_fit_the_error_says_so_and_why():
    oom = r"start=4 does not fit on cpu \(OutOfMemoryError: CUDA out of memory.*start=1"
    with pytest.raises(MemoryError, match=oom):
        find_batch_size(fake_step(3, OOM_ERRORS["torch.OutOfMemoryError"]), start=4, limit=100)


@pytest.mark.parametrize("error", [ValueError("bad labels"), RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
                                   RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED"),
                                   # "out of memory" inside another error's text is not running out
                                   RuntimeError("ran out of memory-mapped file handles"),
                                   RuntimeError("DataLoader worker: out of memory for the queue"),
                                   RuntimeError("could not create a primitive descriptor for a convolution "
                                                "forward propagation primitive")])
def test_other_errors_are_re_raised(error):
    def try_step(batch_size):
        if batch_size >= 16:
            raise error
    with pytest.raises(type(error), match=str(error)[:10]) as raised:
        find_batch_size(try_step, limit=1000)
    assert raised.value is error or raised.value.__cause__ is error  # oneDNN's: with advice
    assert not is_out_of_memory(error)


def test_onednns_out_of_memory_stops_the_search_with_what_to_do():
    """oneDNN caches a kernel that failed to build: later sizes would fail too, so no bisection."""
    tried = []
    with pytest.raises(RuntimeError, match=r"a primitive: oneDNN.*fresh process") as e:
        find_batch_size(fake_step(10, lambda: RuntimeError("could not create a primitive"), tried), limit=100)
    assert tried == [2, 4, 8, 16] and str(e.value.__cause__) == "could not create a primitive"


def test_a_real_cpu_allocator_failure_is_recognised():
    with open("/proc/sys/vm/overcommit_memory") as f:
        if f.read().strip() == "1":
            pytest.skip("overcommit_memory=1: the kernel grants any allocation")

    def try_step(batch_size):  # asks the allocator for a terabyte above 8: no machine here has it
        torch.empty(2**40 if batch_size > 8 else batch_size, dtype=torch.uint8)
    assert find_batch_size(try_step, limit=100, margin=1.0) == 8


def test_model_optimizer_modes_grads_and_rng_are_put_back():
    torch.manual_seed(0)
    model = simple_resnet(3, widths=(4, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(4, 1, 8, 8)).sum().backward()
    opt.step()  # the optimizer has momentum buffers now; gradients are set
    model.eval()
    model.layer_groups[1].train()  # mixed modes survive too
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = [s["momentum_buffer"].clone() for s in opt.state.values()]
    grads = [p.grad.clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()

    def try_step(batch_size):  # three real steps, then out of memory above 32
        model.train()
        for _ in range(3):
            x, y = torch.rand(batch_size, 1, 8, 8), torch.randint(0, 3, (batch_size,))
            F.cross_entropy(model(x), y).backward()
            opt.step()
        if batch_size > 32:
            raise torch.OutOfMemoryError("CUDA out of memory.")

    assert find_batch_size(try_step, limit=40, model=model, optimizer=opt) == 28
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert all(torch.equal(s["momentum_buffer"], b) for s, b in zip(opt.state.values(), buffers))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)

    def broken(batch_size):  # state is put back when the search fails too
        try_step(batch_size)
        raise ValueError("bug in try_step")
    with pytest.raises(ValueError):
        find_batch_size(broken, limit=64, model=model, optimizer=opt)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert [m.training for m in model.modules()] == modes


def test_the_failed_steps_tensors_are_freed_before_the_next_try():
    """A failed step's tensor, caught in a reference cycle and in the traceback, is gone by the
    next try: the search leaves the except block, then runs gc.collect()."""
    failed, alive_at_next_try = [], []

    def try_step(batch_size):
        alive_at_next_try.append([r() is not None for r in failed])
        activations = torch.empty(batch_size, 16)
        cycle = [activations]
        cycle.append(cycle)  # only the cycle collector can free this
        failed.append(weakref.ref(activations))
        if batch_size > 8:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        failed.pop()

    gc.disable()  # no automatic collection that would hide a missing gc.collect()
    try:
        assert find_batch_size(try_step, limit=100, margin=1.0) == 8
    finally:
        gc.enable()
    assert len(failed) == 4 and not any(any(alive) for alive in alive_at_next_try)


def test_verbose_prints_each_try(capsys):
    find_batch_size(fake_step(5, MemoryError), limit=100, verbose=True)
    out = capsys.readouterr().out
    assert "batch size      4: fits" in out and "batch size      8: out of memory (MemoryError)" in out
    find_batch_size(fake_step(5, OOM_ERRORS["CPU allocator"]), limit=100, verbose=True)
    assert ("batch size      8: out of memory (RuntimeError: DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 137438953472 bytes.") in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, match", [
    (dict(limit=0), "limit=0"),
    (dict(limit=10, start=11), "start=11, limit=10"),
    (dict(limit=10, start=0), "start=0"),
    (dict(limit=10.0), "limit=10.0"),  # sizes would become floats
    (dict(limit=10, margin=0), "margin=0"),  # would always give 1
    (dict(limit=10, margin=1.5), "margin=1.5"),  # a size that did not fit
    (dict(limit=10, margin=float("nan")), "margin=nan"),
    (dict(limit=10, device="gpu"), "device 'gpu'"),
    (dict(limit=10, device="cuda:7"), "device 'cuda:7'"),  # no machine here has 8 GPUs
])
def test_bad_arguments(kwargs, match):
    tried = []
    with pytest.raises(ValueError, match=match):
        find_batch_size(fake_step(10, MemoryError, tried), **kwargs)
    assert tried == []  # refused before any try


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_real_cuda_oom_is_survived_and_memory_comes_back():
    device = torch.device("cuda")
    model = simple_resnet(10, widths=(16, 32, 64)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    total = torch.cuda.get_device_properties(device).total_memory
    before = torch.cuda.memory_allocated(device)

    def try_step(batch_size):  # a real step plus a block that grows with the batch: OOM for sure
        hog = torch.empty(batch_size * (total // 64), dtype=torch.uint8, device=device)
        x = torch.rand(batch_size, 1, 28, 28, device=device)
        F.cross_entropy(model(x), torch.zeros(batch_size, dtype=torch.long, device=device)).backward()
        opt.step()
        opt.zero_grad()
        del hog

    found = find_batch_size(try_step, limit=1024, model=model, optimizer=opt)
    assert 1 <= found < 64 and torch.cuda.memory_allocated(device) == before
    x = torch.rand(found, 1, 28, 28, device=device)  # training goes on in the same process
    F.cross_entropy(model(x), torch.zeros(found, dtype=torch.long, device=device)).backward()
    opt.step()
