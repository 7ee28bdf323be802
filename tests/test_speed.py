"""speed.py: which ways are timed for each --precision / --channels-last, the fastest taken, and
a timing that changes nothing (the model, its gradients, the random numbers)."""
import pytest
import torch

import minicnn.speed as speed
from minicnn.data import Batches
from minicnn.models import simple_resnet


@pytest.mark.parametrize("bf16_here", [False, True])
def test_ways_offer_bf16_only_where_it_is_computed_or_asked_for(monkeypatch, bf16_here):
    monkeypatch.setattr(speed, "computes_bf16", lambda device: bf16_here)
    auto = list(speed.ways("cpu"))
    assert auto == ["fp32", "channels_last"] + ["bf16 + channels_last"] * bf16_here
    assert list(speed.ways("cpu", "fp32", "off")) == ["fp32"]
    assert list(speed.ways("cpu", "bf16", "off")) == ["bf16"]  # forced: even where emulated
    assert list(speed.ways("cpu", "auto", "on")) == ["channels_last"] + ["bf16 + channels_last"] * bf16_here
    for name, way in speed.WAYS.items():  # the names say the keywords
        assert way == dict(mixed_precision="bf16" in name, channels_last="channels_last" in name)


def test_fastest_takes_the_smallest_median(monkeypatch):
    seconds = {False: 0.3, True: 0.1}  # channels_last faster here
    monkeypatch.setattr(speed, "seconds_per_step",
                        lambda model, batches, steps, mixed_precision, channels_last: seconds[channels_last])
    name, way, measured = speed.fastest(None, None, speed.ways("cpu", "fp32"))
    assert (name, way) == ("channels_last", speed.WAYS["channels_last"])
    assert measured == {"fp32": 0.3, "channels_last": 0.1}


@pytest.mark.parametrize("name", ["fp32", "channels_last"])
def test_a_timing_changes_neither_the_model_nor_the_random_numbers(name):
    model = simple_resnet(3, 1, (4, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = Batches(torch.randint(0, 256, (32, 1, 12, 12), dtype=torch.uint8), torch.arange(32) % 3, 8,
                      shuffle=True, generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    seconds = speed.seconds_per_step(model, batches, **speed.WAYS[name])
    assert 0 < seconds < 60
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert model.training and all(p.is_contiguous() for p in model.parameters())
