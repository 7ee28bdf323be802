"""Image folders in fastai's from_paths layout as uint8 tensors:
train/<class>/*, valid/<class>/*.

An optional test/* holds unlabelled images. Each image is made RGB (16-bit PNGs scaled to
8 bits: v8 = round(v16 * 255 / 65535); an animation's first frame, with a warning), its
short side resized to `size`, centre-cropped: x uint8 (N, 3, size, size), y int64 (N,),
classes sorted by name. The whole tree is checked before any image is decoded, and every
problem is named in one error.

Source: fast.ai 2018 lesson 2 (ImageClassifierData.from_paths). What is refused, and why:
docs/data.md.
"""
import operator
import os
import re
import warnings
from collections import Counter, namedtuple
from pathlib import Path

import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp"}  # what torchvision.io decodes
ImageFolder = namedtuple("ImageFolder", "train valid test classes")
SUPPORTED = ", ".join(sorted(IMAGE_SUFFIXES))
# the C++ source in torchvision's errors: "decode_png, /.../decode_png.cpp:42, "
CPP_SOURCE = re.compile(r"^[\w ]+, \S+:\d+, ")


def _decode(path, io):
    """One image file -> (uint8 (3, H, W), frames): 16-bit scaled to 8 bits, an animation's
    first frame."""
    if path.is_symlink() and not path.exists():
        raise ValueError(f"a symlink to {os.readlink(path)}, which does not exist")
    # (3, H, W), uint8 or uint16
    image, frames = io.decode_image(str(path), mode=io.ImageReadMode.RGB), 1
    if image.dim() == 4:  # an animated GIF: (frames, 3, H, W)
        frames, image = len(image), image[0]
    if image.dtype == torch.uint16:  # 16-bit PNG: v8 = round(v16 * 255 / 65535)
        image = ((image.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
    return image, frames


def load_images(paths, size, broken, animated):
    """Decode, make RGB, resize the short side to size, centre-crop -> uint8 (N, 3, size, size).
    A file that will not decode is appended to broken, an animation to animated."""
    import torchvision.transforms.v2.functional as TF
    # torchvision 0.29 warns that torchcodec will take decoding over
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import torchvision.io as io
        images = []
        for path in paths:
            try:
                image, frames = _decode(path, io)
            except Exception as e:  # RuntimeError or ValueError, depending on the codec
                broken.append(f"{path} ({CPP_SOURCE.sub('', str(e))})")
                continue
            if frames > 1:
                animated.append(f"{path} ({frames} frames)")
            images.append(TF.center_crop(TF.resize(image, size, antialias=True), [size, size]))
    return torch.stack(images) if images and not broken else None


def _entries(folder):
    """The entries of a folder, sorted; a folder that cannot be listed is named."""
    try:
        return sorted(folder.iterdir())
    except OSError as e:
        raise ValueError(f"{folder}: cannot list it ({e.strerror})") from e


def _is_image(p):
    # a dangling symlink counts, so that decoding names it instead of skipping it
    return (p.suffix.lower() in IMAGE_SUFFIXES
            and (p.is_file() or (p.is_symlink() and not p.exists())))


def _describe(entries):
    """What a folder holds, counted by suffix: '.tif: 2, folder: 1'."""
    kinds = Counter("folder" if p.is_dir() else p.suffix.lower() or "no suffix" for p in entries)
    return ", ".join(f"{kind}: {n}" for kind, n in sorted(kinds.items())) or "nothing"


def _images_in(folder, problems, skipped, fix):
    """The image files of one folder; none is a problem, anything else is noted in skipped."""
    entries = _entries(folder)
    images, others = [p for p in entries if _is_image(p)], [p for p in entries if not _is_image(p)]
    if not images:
        problems.append(f"{folder}: no images (it holds {_describe(entries)}; "
                        f"supported: {SUPPORTED}); {fix}")
    elif others:
        skipped.append(f"{folder}: {_describe(others)}")
    return images


def _scan_split(split, problems, skipped, classes=None):
    """train/ or valid/ -> {class: [image files]}; what is wrong is appended to problems."""
    if not split.is_dir():
        problems.append(f"{split}: no such folder; "
                        f"expected {split.parent}/{split.name}/<class>/<image>")
        return {}
    entries = _entries(split)
    if [p for p in entries if not p.is_dir()]:
        skipped.append(f"{split}: {_describe([p for p in entries if not p.is_dir()])} "
                       "outside the class folders")
    files = {d.name: _images_in(d, problems, skipped,
                                "add images, convert them, or remove the folder")
             for d in entries if d.is_dir()}
    if classes is None and len(files) < 2:
        found = (f"only the class {sorted(files)}" if files
                 else f"no class folders (it holds {_describe(entries)})")
        problems.append(f"{split}: {found}; a classifier needs at least 2 classes, each a folder "
                        f"of images, {split}/<class>/<image>")
    if classes and sorted(files) != classes:
        problems.append(f"{split}: classes differ from train/: "
                        f"missing {sorted(set(classes) - set(files))}, "
                        f"extra {sorted(set(files) - set(classes))}")
    return files


def load_image_folder(path, size):
    """train/<class>/*, valid/<class>/* (and optional test/*) -> ImageFolder of uint8 tensors.
    The whole tree is checked before any image is decoded; every problem is named in one error."""
    size = operator.index(size)  # an int: 2.5 or "64" is a TypeError here, before any work
    if size < 1:
        raise ValueError(f"size={size}: give the side of the square images, 1 or more")
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder")
    problems, skipped = [], []
    train = _scan_split(path / "train", problems, skipped)
    classes = sorted(train)
    valid = _scan_split(path / "valid", problems, skipped, classes)
    test = None
    if (path / "test").exists():
        test = _images_in(path / "test", problems, skipped,
                          f"test/ holds unlabelled images directly, {path / 'test'}/<image>; "
                          "or remove it")
    if problems:
        raise ValueError(f"{path}: cannot load this image folder:\n  " + "\n  ".join(problems))
    if skipped:
        warnings.warn(f"{path}: skipped what is not an image (supported: {SUPPORTED}): "
                      + "; ".join(skipped), stacklevel=2)
    broken, animated = [], []
    x_train, x_valid = [load_images([p for c in classes for p in part[c]], size, broken, animated)
                        for part in (train, valid)]
    x_test = load_images(test, size, broken, animated) if test else None
    if broken:  # every file that will not decode, in one error
        raise ValueError(f"{len(broken)} image(s) cannot be decoded: " + "; ".join(broken))
    if animated:
        warnings.warn(f"{len(animated)} animated image(s), only the first frame of each is used: "
                      + ", ".join(animated), stacklevel=2)
    y_train, y_valid = [torch.tensor([label for label, c in enumerate(classes) for _ in part[c]])
                        for part in (train, valid)]
    return ImageFolder((x_train, y_train), (x_valid, y_valid), x_test, classes)
