"""tta.py: identity TTA equals the plain prediction, probabilities (not logits) are averaged,
beta mixes as fastai 2, order and modes are kept, no gradients, every error path."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from minicnn.augment import side_on
from minicnn.tta import predict_tta


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.5),
                          nn.Flatten(), nn.Linear(3 * 6 * 6, 4))
    with torch.no_grad():                       # BN running stats far from the batch stats, so
        model[1].running_mean.fill_(0.3)        # train mode would give a different answer
        model[1].running_var.fill_(2.0)
    return model.train()


def data(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 6, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def as_batches(x, y, size=4):
    return list(zip(x.split(size), y.split(size)))


def plain(model, x):
    model.eval()
    with torch.no_grad():
        return torch.softmax(model(x), dim=1)


def hflip(x):
    return x.flip(-1)


@given(n_aug=st.integers(0, 5), beta=st.one_of(st.none(), st.floats(0, 1)))
def test_identity_augmentation_equals_the_plain_prediction(n_aug, beta):
    model, (x, y) = tiny_model(), data()
    probs = predict_tta(model, as_batches(x, y), augment=lambda v: v, n_aug=n_aug, beta=beta)
    assert torch.allclose(probs, plain(model, x), atol=1e-6)


@given(n_aug=st.integers(1, 4), beta=st.one_of(st.none(), st.floats(0, 1)))
def test_mean_of_probabilities_mixed_with_beta_as_fastai2(n_aug, beta):
    model, (x, y) = tiny_model(), data()
    p_plain, p_flip = plain(model, x), plain(model, hflip(x))
    weight = 1 / (n_aug + 1) if beta is None else beta     # the plain view's weight
    expected = weight * p_plain + (1 - weight) * p_flip
    probs = predict_tta(model, as_batches(x, y), augment=hflip, n_aug=n_aug, beta=beta)
    assert torch.allclose(probs, expected, atol=1e-6)
    assert torch.allclose(probs.sum(1), torch.ones(len(x)), atol=1e-6)


def test_probabilities_are_averaged_not_logits():
    model, (x, y) = tiny_model(), data()
    model.eval()
    with torch.no_grad():
        model[5].weight.mul_(30)                # confident views, where the two means part
        logit_mean = torch.softmax((model(x) + model(hflip(x))) / 2, dim=1)
    probs = predict_tta(model, as_batches(x, y), augment=hflip, n_aug=1)
    assert torch.allclose(probs, (plain(model, x) + plain(model, hflip(x))) / 2, atol=1e-6)
    assert not torch.allclose(probs, logit_mean, atol=1e-4)


def test_keeps_the_order_of_a_shuffled_input():
    model, (x, y) = tiny_model(), data(12)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    probs = predict_tta(model, as_batches(x, y), augment=hflip, n_aug=2)
    shuffled = predict_tta(model, as_batches(x[perm], y[perm], size=5), augment=hflip, n_aug=2)
    assert torch.allclose(shuffled, probs[perm], atol=1e-6)


def test_runs_in_eval_mode_without_gradients_and_restores_every_modules_mode():
    model, (x, y) = tiny_model(), data()
    model[1].eval()                              # a frozen BatchNorm inside a training model
    probs = predict_tta(model, as_batches(x, y), augment=hflip, n_aug=1)
    assert torch.allclose(probs, (plain(model, x) + plain(model, hflip(x))) / 2, atol=1e-6)
    model.train()
    model[1].eval()
    predict_tta(model, as_batches(x, y), augment=hflip, n_aug=1)
    assert [m.training for m in model] == [True, False, True, True, True, True]
    assert not probs.requires_grad and all(p.grad is None for p in model.parameters())
    assert probs.dtype == torch.float32 and probs.device.type == "cpu"


def test_modes_restored_after_an_error():
    model, (x, y) = tiny_model(), data()

    def broken(v):
        raise RuntimeError("augmentation failed")
    with pytest.raises(RuntimeError, match="augmentation failed"):
        predict_tta(model, as_batches(x, y), augment=broken)
    assert all(m.training for m in model.modules())


def test_preset_name_with_a_generator_is_seeded_and_equals_the_preset_function():
    model, (x, y) = tiny_model(), data()
    batches = as_batches(x, y)
    by_name = predict_tta(model, batches, augment="side_on", generator=torch.Generator().manual_seed(3))
    again = predict_tta(model, batches, augment="side_on", generator=torch.Generator().manual_seed(3))
    function = predict_tta(model, batches, augment=side_on(generator=torch.Generator().manual_seed(3)))
    other = predict_tta(model, batches, augment="side_on", generator=torch.Generator().manual_seed(4))
    assert torch.equal(by_name, again) and torch.equal(by_name, function)
    assert not torch.equal(by_name, other)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(augment=hflip, n_aug=-1), ValueError, "n_aug=-1"),
    (dict(augment=hflip, beta=1.5), ValueError, "beta=1.5"),
    (dict(augment=hflip, beta=-0.25), ValueError, "beta=-0.25"),
    (dict(augment=hflip, beta=float("nan")), ValueError, "beta=nan"),
])
def test_bad_arguments_say_what_is_wrong(kwargs, error, match):
    model, (x, y) = tiny_model(), data()
    with pytest.raises(error, match=match):
        predict_tta(model, as_batches(x, y), **kwargs)


def test_no_batches_is_an_error():
    with pytest.raises(ValueError, match="no batches"):
        predict_tta(tiny_model(), [], augment=hflip)
    used_up = iter(as_batches(*data()))
    list(used_up)
    with pytest.raises(ValueError, match="used up"):
        predict_tta(tiny_model(), used_up, augment=hflip)


@pytest.mark.parametrize("model, batches, error, match", [
    (None, torch.rand(2, 1, 6, 6), TypeError, r"batch 0.*\(6, 6\)"),               # a tensor, not batches
    (None, [torch.rand(2, 1, 6, 6)], TypeError, r"batch 0.*\(1, 6, 6\)"),          # a batch without y
    (None, [(torch.rand(2, 1, 6, 6), None), (torch.rand(2, 6, 6), None)], TypeError, r"batch 1.*\(2, 6, 6\)"),
    (None, [(torch.zeros(2, 1, 6, 6, dtype=torch.uint8), None)], TypeError, "batch 0.*uint8"),
    (nn.Flatten(0), [(torch.rand(2, 1, 6, 6), None)], ValueError, r"\(72,\) for 2 images"),
])
def test_bad_model_or_batches_say_what_is_wrong(model, batches, error, match):
    with pytest.raises(error, match=match):
        predict_tta(tiny_model() if model is None else model, batches, augment=hflip)


def test_an_augmentation_that_changes_the_batch_size_is_caught():
    with pytest.raises(ValueError, match=r"\(5, 4\) for 10 images"):
        predict_tta(tiny_model(), [data()], augment=lambda v: v[:5])
