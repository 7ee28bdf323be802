"""A trained classifier saved as one file, model.pt, that predicts without any training code:
fastai's learn.export() and load_learner(path).

model.pt = {weights (CPU tensors), the architecture's name and keyword arguments, the class
names, the input size and channels, what to do to the pixels, the augmentation preset (for
TTA), the test accuracy}, written atomically with a sha256 of every value by
minicnn/checkpoint.py. load_model rebuilds the network with minicnn/models.py (which needs
minicnn/efficientnet.py) from random weights, no download, and loads the saved ones into it.
Input the model expects: uint8 pixels as x = pixels / 255 in [0, 1], RGB (3 channels) or grey
(1), size x size; the model computes (x - mean) / std itself, in its first layer (its mean
and std are stored too, for the record). The preset's name is checked against
minicnn/augment.py. More: docs/export.md.
Copied out, it needs minicnn/checkpoint.py, minicnn/atomic.py, minicnn/models.py,
minicnn/efficientnet.py and minicnn/augment.py beside it.
"""
import re
from collections import OrderedDict
from pathlib import Path

import torch

from minicnn.augment import AUGMENTATIONS
from minicnn.checkpoint import load_checked, save_checked
from minicnn.models import PRETRAINED_ARCHS, Normalize, pretrained_classifier, simple_resnet

VERSION = 1  # raised when the contents change; an older minicnn refuses a newer file
FORMAT = f"minicnn-model-{VERSION}"
ARCHS = ("simple_resnet",) + PRETRAINED_ARCHS
# what other minicnn files are, by their format tag: named when one is given to load_model
OTHER_FILES = {"minicnn-checkpoint": "a training checkpoint (minicnn.checkpoint.save_checkpoint)",
               "minicnn-snapshot": "a snapshot of weights alone (minicnn.snapshot)",
               "minicnn-features": "a cache of a body's activations (minicnn.precompute)",
               "minicnn-lesson2-body": "lesson2's cache of its pretrained body"}


def export_model(path, model, *, arch, arch_kwargs, classes, size, channels, preset=None,
                 test_accuracy=None):
    """Write `model` to `path` (model.pt) with all load_model and minicnn.predict need -> path.

    arch: "simple_resnet" or one of models.PRETRAINED_ARCHS. arch_kwargs: the builder's other
    keyword arguments, e.g. {"widths": (16, 32, 64)}; n_classes is len(classes) and in_channels
    is channels. The input normalisation is read from the model's first layer (Normalize).
    preset: the training augmentation ("side_on", "top_down"), for TTA. The architecture is
    rebuilt and compared with model's weights before a file is written.
    """
    # what minicnn.predict reads, which the weights cannot confirm
    if not (isinstance(size, int) and size >= 1) or preset not in (None, *AUGMENTATIONS):
        raise ValueError(f"{size=}, {preset=}: need an int >= 1, and None or one of "
                         f"{sorted(AUGMENTATIONS)}")
    with torch.random.fork_rng(devices=[]):  # random weights: exporting moves no random number
        rebuilt = build(arch, len(classes), channels, arch_kwargs).state_dict()
    state = model.state_dict()
    differ = sorted(set(state) ^ set(rebuilt)) or [k for k in state
                                                   if state[k].shape != rebuilt[k].shape]
    if differ:  # the file would not load back
        raise ValueError(f"{arch}, {channels} channels, {arch_kwargs}: not this model, {differ[0]}")
    normalize = next(m for m in model.modules() if isinstance(m, Normalize))  # every arch has it
    weights = OrderedDict((k, v.detach().cpu()) for k, v in state.items())
    if hasattr(state, "_metadata"):  # module versions, which steer load_state_dict
        weights._metadata = state._metadata
    contents = {
        "arch": arch, "arch_kwargs": dict(arch_kwargs), "classes": list(classes), "size": size,
        "channels": channels, "preset": preset,
        "test_accuracy": None if test_accuracy is None else float(test_accuracy),
        # what a caller does to uint8 pixels; the model then computes (x - mean) / std itself
        "input": "x = pixels / 255",
        "mean": normalize.mean.flatten().tolist(), "std": normalize.std.flatten().tolist(),
        "weights": weights,
    }
    return save_checked(path, FORMAT, contents)


def load_model(path, device="cpu"):
    """The model saved by export_model (path: model.pt, or the folder holding it), in eval mode
    on `device` -> (model, info).

    info: every saved value but the weights (arch, arch_kwargs, classes, size, channels,
    preset, test_accuracy, input, mean, std). A missing, damaged (checksum), foreign or
    newer-format file is refused by name before anything is built.
    """
    path = Path(path)
    if path.is_dir():  # a lesson's --out folder, as fastai's load_learner(folder)
        path = path / "model.pt"
    try:
        saved = load_checked(path, FORMAT, "model")
    except ValueError as error:
        raise ValueError(_what_it_is(path) or str(error)) from error
    model = build(saved["arch"], len(saved["classes"]), saved["channels"], saved["arch_kwargs"])
    model.load_state_dict(saved["weights"])  # every key, every shape: strict
    info = {k: v for k, v in saved.items() if k != "weights"}
    return model.to(device).eval(), info


def build(arch, n_classes, channels, arch_kwargs):
    """The network `arch` with random weights: nothing is downloaded or read from a cache."""
    if arch not in ARCHS:  # a newer minicnn's file, or a typo (before arch_kwargs meet a builder)
        raise ValueError(f"arch={arch!r}: this minicnn builds {', '.join(ARCHS)}")
    if arch == "simple_resnet":
        return simple_resnet(n_classes, channels, **arch_kwargs)
    return pretrained_classifier(arch, n_classes, in_channels=channels, pretrained=False,
                                 download=False, **arch_kwargs)


def _what_it_is(path):
    """Why a file that load_checked refused is not a model this minicnn reads, or None."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not torch.save's, or too damaged to say
        return None
    tag = saved.get("format") if isinstance(saved, dict) else None
    version = re.fullmatch(r"minicnn-model-(\d+)", str(tag))
    if version and int(version.group(1)) > VERSION:
        return (f"{path} was made by a newer minicnn (format {tag}; this one reads {FORMAT}): "
                "upgrade minicnn to load it")
    for prefix, what in OTHER_FILES.items():
        if str(tag).startswith(prefix):
            return (f"{path} is {what}, not an exported model; a lesson writes model.pt into its "
                    "--out folder (minicnn.export.export_model)")
    if isinstance(saved, dict) and saved and all(isinstance(v, torch.Tensor)
                                                 for v in saved.values()):
        return (f"{path} holds bare weights (torch.save(model.state_dict())): no architecture "
                "or class names to rebuild the model from; load them with "
                "model.load_state_dict(torch.load(path)), or save with export_model")
    return None
