"""The largest batch that fits in memory, found by trying: double until out-of-memory, then
bisect, then keep a safety margin. The process survives every out-of-memory error.

    b = start; double b (capped at limit) while try_step(b) fits
    -> good = largest that fit, bad = first that did not
    while bad - good > 1:  mid = (good + bad) // 2;  good or bad <- mid
    return min(limit, floor(margin * good))        or `limit` when even `limit` fit
After each out-of-memory error the failed step's tensors are freed (leave the except block,
gc.collect(), torch.cuda.empty_cache()); afterwards model, optimizer and RNG are as they were.

Source: fast.ai 2018 lesson 2 ("make it as big as possible until you run out of memory");
PyTorch Lightning's scale_batch_size (doubling, then binary search). More: docs/batch_size.md.
Copied out, it needs minicnn/data.py beside it (its parse_device reads the device).
"""
import contextlib
import gc
import math
import re
import time

import torch

from minicnn.data import parse_device


def find_batch_size(try_step, *, start=2, limit, margin=0.9, device=None, model=None,
                    optimizer=None, verbose=False):
    """The largest batch size b <= limit with try_step(b) not running out of memory, times margin.

    try_step(batch_size): a few real training steps at that size (3 is plenty: the first
        step allocates, later ones add the optimizer's state); returns nothing and keeps
        nothing (no output in a global or a closure), or its memory cannot be freed.
    start: first size tried. limit: the largest size worth having (the dataset's size).
    margin: keep floor(margin * largest) for headroom; 1 keeps the largest.
    device: where memory runs out (default: the model's, else the CPU).
    model, optimizer: restored afterwards (weights, buffers, modes, gradients, state).
    Raises MemoryError when even `start` does not fit; any other error of try_step is re-raised.
    """
    _check_sizes(start, limit, margin)
    if device is None:  # the model's, else the CPU
        params = model.parameters() if model is not None else []
        device = next((p.device for p in params), "cpu")
    device = parse_device(device)
    with _put_back(model, optimizer, device):
        # doubling: start, 2*start, 4*start, ... until out-of-memory or the limit
        good, bad, size = 0, None, start
        while True:
            failure = _out_of_memory(try_step, size, device, verbose)
            if failure:
                bad = size
                break
            good = size
            if size == limit:
                break
            size = min(2 * size, limit)  # b <- min(2b, limit)
        if good == 0:
            raise MemoryError(f"start={start} does not fit on {device} ({failure}); try start=1")
        # bisection between the last size that fit and the first that did not
        while bad is not None and bad - good > 1:
            mid = (good + bad) // 2  # good or bad <- mid, until they are neighbours
            if _out_of_memory(try_step, mid, device, verbose):
                bad = mid
            else:
                good = mid
    if bad is None:  # even `limit` fit: memory is not what bounds the batch, no margin needed
        return limit
    return min(limit, max(1, math.floor(margin * good)))


# CUDA, MPS, XPU: torch.OutOfMemoryError (torch.cuda's before torch 2.5)
TORCH_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
# the CPU allocator: a RuntimeError whose message, after "[enforce fail at alloc_cpu.cpp:127]
# err == 0. ", starts so (words inside another error's text are not enough: "ran out of
# memory-mapped file handles" is not running out of memory)
CPU_OOM = ("DefaultCPUAllocator: can't allocate memory",  # Linux, macOS
           "DefaultCPUAllocator: not enough memory",      # Windows
           "MPS backend out of memory")                   # Apple GPUs (older torch)
# oneDNN (the CPU's convolution library) says exactly this when memory runs out while it builds
# a kernel ("... primitive descriptor ..." means unsupported: another error).
ONEDNN_OOM = "could not create a primitive"
ONEDNN_ADVICE = ("oneDNN (CPU convolutions) ran out of memory building a kernel and caches the "
                 "failure, so later sizes would fail too: start a fresh process and bound the "
                 "search with `limit` (docs/batch_size.md)")


def is_out_of_memory(error):
    """True for torch.OutOfMemoryError, Python's MemoryError and the CPU allocator's error only."""
    if isinstance(error, (TORCH_OOM, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and _without_location(error).startswith(CPU_OOM)


def _without_location(error):
    """The error's text without the C++ location "[enforce fail at ...] err == 0. "."""
    return re.sub(r"^\[enforce fail at [^\]]*\][^.]*\.\s*", "", str(error).strip())


def _short(error):
    """'RuntimeError: DefaultCPUAllocator: ...' without the C++ source location, one line."""
    text = _without_location(error)
    return type(error).__name__ + (f": {text.splitlines()[0][:120]}" if text else "")


def _out_of_memory(try_step, batch_size, device, verbose):
    """None when try_step(batch_size) fits, else the out-of-memory error's text."""
    started = time.perf_counter()
    try:
        try_step(batch_size)
        message = None
    except Exception as error:
        if isinstance(error, RuntimeError) and str(error).strip().endswith(ONEDNN_OOM):
            raise RuntimeError(f"{error}: {ONEDNN_ADVICE}") from error
        if not is_out_of_memory(error):
            raise
        message = _short(error)  # text only: no reference to the error's tensors
    if message is not None:
        # Out of the except block: Python has deleted `error` and, with it, the traceback whose
        # frames held the failed step's tensors; only now can gc and empty_cache free them.
        _free_memory(device)
    if verbose:
        outcome = "fits" if message is None else f"out of memory ({message})"
        print(f"  batch size {batch_size:6d}: {outcome} "
              f"({time.perf_counter() - started:.2f}s)", flush=True)
    return message


def _free_memory(device):
    gc.collect()  # frames of the failed step caught in reference cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()  # cached blocks back to the driver, so the next try starts clean


@contextlib.contextmanager
def _put_back(model, optimizer, device):
    """Model weights, modes and gradients, optimizer state and torch's RNG as they were, after
    the search, whether it ends or fails. The copies live on the CPU: they take no memory from
    the device being searched."""
    model_state = _cpu_copy(model.state_dict()) if model is not None else None
    modes = [(m, m.training) for m in model.modules()] if model is not None else []
    # copies: backward accumulates into an existing .grad in place; usually they are all None
    grads = [(p, _cpu_copy(p.grad)) for p in model.parameters()] if model is not None else []
    optimizer_state = _cpu_copy(optimizer.state_dict()) if optimizer is not None else None
    rng_state = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        if model is not None:
            model.load_state_dict(model_state)  # copies into the same Parameters, on their device
            for module, training in modes:
                module.training = training
            for p, grad in grads:
                p.grad = None if grad is None else grad.to(p.device)
        if optimizer is not None:
            optimizer.load_state_dict(optimizer_state)
        torch.set_rng_state(rng_state)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _cpu_copy(obj):
    """Tensors anywhere in a state dict, copied to the CPU; everything else as it is."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def _check_sizes(start, limit, margin):
    if not (isinstance(start, int) and isinstance(limit, int) and 1 <= start <= limit):
        raise ValueError(f"find_batch_size: {start=}, {limit=}: need ints 1 <= start <= limit")
    if not 0 < margin <= 1:  # 0 would give 1, above 1 a size that did not fit
        raise ValueError(f"find_batch_size: {margin=} must be in (0, 1]")
