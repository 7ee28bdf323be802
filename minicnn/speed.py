"""The fastest way to run this model's training step on this machine, found by timing each.

A step can run in fp32 on contiguous (NCHW) tensors, on channels_last (NHWC) tensors, or
under bf16 autocast. Which is fastest depends on the machine: bf16 pays only where the CPU
(avx512_bf16, AMX) or the GPU computes it (elsewhere torch emulates it, many times slower),
channels_last where oneDNN or cuDNN has NHWC kernels for these layers. So measure:
    seconds(way) = median over `steps` training steps (forward, loss, backward) after one
                   warm-up step, on a copy of the model; the way taken = argmin seconds(way)
Nothing changes: not the model, not a random number.

Source: PyTorch's performance tuning guide (channels_last, autocast). docs/speed.md.
"""
import copy
import itertools
import statistics
import time

import torch
import torch.nn.functional as F


WAYS = {"fp32": dict(mixed_precision=False, channels_last=False),  # as fit's keywords
        "channels_last": dict(mixed_precision=False, channels_last=True),
        "bf16": dict(mixed_precision=True, channels_last=False),
        "bf16 + channels_last": dict(mixed_precision=True, channels_last=True)}


def computes_bf16(device):
    """True on CUDA and on a CPU with bf16 arithmetic (avx512_bf16 or AMX)."""
    if torch.device(device).type == "cuda":
        return True
    return any(getattr(torch.cpu, name, lambda: False)()
               for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def ways(device, precision="auto", channels_last="auto"):
    """The ways worth timing, {name: fit's keywords}: precision "fp32", "bf16" or "auto" (bf16
    only where the device computes it); channels_last "on", "off" or "auto" (both). With both
    auto, bf16 goes with channels_last only (alone it was the slower of the two)."""
    bf16 = dict(auto=(False, True) if computes_bf16(device) else (False,),
                fp32=(False,), bf16=(True,))[precision]
    nhwc = dict(auto=(False, True), off=(False,), on=(True,))[channels_last]
    return {name: way for name, way in WAYS.items()
            if way["mixed_precision"] in bf16 and way["channels_last"] in nhwc
            and not (name == "bf16" and precision == channels_last == "auto")}


def seconds_per_step(model, batches, *, mixed_precision=False, channels_last=False,
                     backward=True, steps=3, per_image=False):
    """Median seconds of a step (forward, and backward unless backward=False) over a few of epoch
    0's batches, or of one image of them (per_image), on a copy of the model."""
    model = copy.deepcopy(model)
    device = next(model.parameters()).device
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    times = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for x, y in itertools.islice(batches.epoch(0), steps + 1):  # the first one warms up
            started = time.perf_counter()
            x = x.to(device)
            x = x.contiguous(memory_format=layout) if x.dim() == 4 else x
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision):
                with torch.set_grad_enabled(backward):
                    loss = F.cross_entropy(model(x).float(), y.to(device))
            if backward:
                loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - started) / (len(x) if per_image else 1))
    return statistics.median(times[1:] or times)


def fastest(model, batches, candidates, *, steps=3):
    """-> (name, fit's keywords, {name: seconds a step}) of the quickest of candidates (ways())."""
    seconds = {name: seconds_per_step(model, batches, steps=steps, **way)
               for name, way in candidates.items()}
    name = min(seconds, key=seconds.get)  # a tie goes to the first, the plainest
    return name, candidates[name], seconds
