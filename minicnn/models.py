"""Models whose parameters come in layer groups: a small ResNet written out.

Every model here exposes `model.layer_groups`, a list of 3 modules (early body,
late body, head) that together hold every parameter exactly once, so that
freezing and differential learning rates can work group by group (fastai 0.7
split a ResNet the same way: stem+layer1+layer2, layer3+layer4, head).

Models take float images in [0, 1] and normalise them themselves (first layer),
so augmentation, TTA and plots all work on plain [0, 1] pixels.

Residual block (He et al. 2016, "Deep Residual Learning"):
    out = relu(x + bn(conv(relu(bn(conv(x))))))
Downsampling uses a stride-2 conv-BN-ReLU between stages instead of a projection
shortcut; it keeps the code short and costs nothing on 28x28 images.
"""
import torch
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std per channel, with mean and std kept as buffers (saved, moved with .to())."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


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
        return torch.relu(x + self.bn2(self.conv2(self.conv1(x))))


class GroupedModel(nn.Module):
    """Runs its layer groups in order; what freezing and differential LRs need to see."""

    def __init__(self, *groups):
        super().__init__()
        self.layer_groups = nn.ModuleList(groups)

    def forward(self, x):
        for group in self.layer_groups:
            x = group(x)
        return x


def simple_resnet(n_classes, in_channels=1, widths=(16, 32, 64), *, mean=None, std=None):
    """A 3-stage ResNet; widths[i] channels in stage i, each stage after the first halves H and W.

    Groups: [normalise, stem, stage 1], [stages 2..], [pool, linear]. mean/std default to
    Fashion-MNIST's for 1 channel and ImageNet's for 3.
    """
    if in_channels not in (1, 3) and (mean is None or std is None):
        raise ValueError(f"in_channels={in_channels}: pass mean= and std= for {in_channels} channels")
    if mean is None:
        mean, std = ((0.2860,), (0.3530,)) if in_channels == 1 else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    if len(widths) < 2:
        raise ValueError(f"widths={widths}: need at least 2 stages (early and late body)")
    early = nn.Sequential(Normalize(mean, std), conv_bn_relu(in_channels, widths[0]), ResidualBlock(widths[0]))
    late = []
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        late += [conv_bn_relu(c_in, c_out, stride=2), ResidualBlock(c_out)]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], n_classes))
    return GroupedModel(early, nn.Sequential(*late), head)
