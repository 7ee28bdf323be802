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
"""
import numbers
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
SET_BY_EXPORT = ("n_classes", "in_channels", "pretrained", "download", "head")
# what other minicnn files are, by their format tag: named when one is given to load_model
OTHER_FILES = {"minicnn-checkpoint": "a training checkpoint (minicnn.checkpoint.save_checkpoint)",
               "minicnn-snapshot": "a snapshot of weights alone (minicnn.snapshot)",
               "minicnn-features": "a cache of a body's activations (minicnn.precompute)",
               "minicnn-lesson2-body": "lesson2's cache of its pretrained body"}


def build(arch, n_classes, channels, arch_kwargs):
    """The network `arch` with random weights: nothing is downloaded or read from a cache."""
    if arch not in ARCHS:
        raise ValueError(f"architecture {arch!r} is not one minicnn builds: {', '.join(ARCHS)}")
    if arch == "simple_resnet":
        return simple_resnet(n_classes, channels, **arch_kwargs)
    return pretrained_classifier(arch, n_classes, in_channels=channels, pretrained=False,
                                 download=False, **arch_kwargs)


def _check(classes, size, channels, preset, test_accuracy):
    if (not isinstance(classes, (list, tuple)) or len(classes) < 2
            or not all(isinstance(c, str) for c in classes) or len(set(classes)) < len(classes)):
        raise ValueError(f"classes={classes!r} must be 2 or more different names (strings), "
                         "in the order of the model's outputs")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size={size!r} must be the side of the square training images, "
                         "an int >= 1")
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"channels={channels!r} must be 3 (RGB) or 1 (grey)")
    if preset is not None and preset not in AUGMENTATIONS:
        raise ValueError(f"preset={preset!r} must be one of {sorted(AUGMENTATIONS)} or None")
    if test_accuracy is not None and (isinstance(test_accuracy, bool)
                                      or not isinstance(test_accuracy, numbers.Real)
                                      or not 0 <= test_accuracy <= 1):
        raise ValueError(f"test_accuracy={test_accuracy!r} must be a fraction in [0, 1] or None")


def export_model(path, model, *, arch, arch_kwargs, classes, size, channels, preset=None,
                 test_accuracy=None):
    """Write `model` to `path` (model.pt) with all load_model and minicnn.predict need -> path.

    arch: "simple_resnet" or one of models.PRETRAINED_ARCHS. arch_kwargs: the builder's other
    keyword arguments, e.g. {"widths": (16, 32, 64)}; n_classes is len(classes) and in_channels
    is channels. The input normalisation is read from the model's first layer (Normalize).
    preset: the training augmentation ("side_on", "top_down"), for TTA. Everything is checked,
    and the architecture rebuilt and compared with model's weights, before a file is written.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check(classes, size, channels, preset, test_accuracy)
    if not isinstance(arch_kwargs, dict) or set(arch_kwargs) & set(SET_BY_EXPORT):
        raise ValueError(f"arch_kwargs={arch_kwargs!r} must be a dict of the builder's other "
                         f"keyword arguments, without {', '.join(SET_BY_EXPORT)}")
    try:  # built from random weights: under fork_rng, so exporting moves no random number
        with torch.random.fork_rng(devices=[]):
            rebuilt = build(arch, len(classes), channels, arch_kwargs).state_dict()
    except TypeError as error:  # a keyword the builder does not take
        raise ValueError(f"arch_kwargs={arch_kwargs!r}: {arch} cannot be built with them "
                         f"({error})") from error
    state = model.state_dict()
    differ = sorted(set(state) ^ set(rebuilt)) or [k for k in state
                                                   if state[k].shape != rebuilt[k].shape]
    if differ:
        raise ValueError(f"{arch}({len(classes)} classes, {channels} channels, {arch_kwargs}) is "
                         f"not this model: keys or shapes differ at {', '.join(differ[:5])}; "
                         "give the arch and arch_kwargs the model was built with")
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


def load_model(path, device="cpu"):
    """The model saved by export_model, in eval mode on `device` -> (model, info).

    info: every saved value but the weights (arch, arch_kwargs, classes, size, channels,
    preset, test_accuracy, input, mean, std). A missing, damaged (checksum), foreign or
    newer-format file, or an architecture this minicnn cannot build, is refused by name
    before anything is built.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a model file; give the file's path, "
                                f"e.g. {path / 'model.pt'}")
    try:
        saved = load_checked(path, FORMAT, "model")
    except ValueError as error:
        raise ValueError(_what_it_is(path) or str(error)) from error
    if saved.get("arch") not in ARCHS:
        raise ValueError(f"{path}: architecture {saved.get('arch')!r} is not one this minicnn "
                         f"builds ({', '.join(ARCHS)}); was it made by a newer minicnn?")
    model = build(saved["arch"], len(saved["classes"]), saved["channels"], saved["arch_kwargs"])
    model.load_state_dict(saved["weights"])  # every key, every shape: strict
    info = {k: v for k, v in saved.items() if k != "weights"}
    return model.to(device).eval(), info
