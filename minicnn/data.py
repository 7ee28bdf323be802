"""Images as uint8 tensors, stratified splits of them, and shuffled minibatches on a device.

Fashion-MNIST from its four IDX files: bytes 0 0 8 D, then D big-endian uint32 sizes, then
the uint8 values. Image folders in fastai's from_paths layout, train/<class>/*,
valid/<class>/*, optional test/*: each image made RGB, its short side resized to `size`,
centre-cropped. Both give x uint8 (N, C, H, W) and y int64 (N,). Stratified split: class c
of n_c samples gets n * n_c / N of the n (largest remainder), at least 1 in each part.
Batches: epoch e's order is randperm(N) seeded with seed + e, the same after a resume;
x travels as uint8 and becomes x / 255 on the device.

Source: fast.ai 2018 lesson 2 (ImageClassifierData.from_paths); the IDX format of
yann.lecun.com/exdb/mnist. What is refused, and why: docs/data.md.
"""
import gzip
import operator
import os
import re
import warnings
from collections import Counter, namedtuple
from pathlib import Path

import torch

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Per-channel statistics of the 60,000 training images, on [0, 1] pixels.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
USER_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minicnn" / "fashion-mnist"
IDX_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
             "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp"}  # what torchvision.io decodes
ImageFolder = namedtuple("ImageFolder", "train valid test classes")


def _count(n, name, low=None):
    """n as an int (>= low when given), or a ValueError naming the argument."""
    try:
        if isinstance(n, bool):
            raise TypeError
        n = operator.index(n)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {n!r} ({type(n).__name__})") from None
    if low is not None and n < low:
        raise ValueError(f"{name} must be >= {low}, got {n}")
    return n


def _labels(y, name="y"):
    """y as a 1-D integer tensor of class labels, or a ValueError that says what to do."""
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"{name} must be a torch tensor of class labels, got {type(y).__name__}: "
                         "convert it with torch.as_tensor")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class labels, got {y.dtype}: "
                         "if they are whole numbers 0..n_classes-1, pass y.long()")
    if y.dim() != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {tuple(y.shape)}: one label per sample")
    return y


def _pair(x, y):
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor of samples (N, ...), got {type(x).__name__}")
    y = _labels(y)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels: x and y must pair up, one label per image")
    return y


def read_idx(path):
    """One IDX file -> uint8 tensor of the shape its header gives; errors name the file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip raises these for truncated or non-gzip files
        raise ValueError(f"{path}: cannot read ({e}); delete it and fetch the data again") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of uint8 (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated header")
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(torch.tensor(shape).prod())
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, the header {shape} says {expected}; "
                         "the file is truncated or corrupt")
    if expected == header:  # no values (frombuffer refuses an empty buffer)
        return torch.empty(shape, dtype=torch.uint8)
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def _find_idx(folder, name):
    for candidate in (Path(folder) / name, Path(folder) / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _explicit(root):
    """The folder the caller named -> (what, folder), or None: root= first, then $MINICNN_DATA."""
    if root is not None:
        if str(root) == "":
            raise ValueError("root='' names no folder: pass the folder of the four IDX files, or None")
        return f"root={root}", Path(root)
    if os.environ.get("MINICNN_DATA"):  # set and not empty
        return f"MINICNN_DATA={os.environ['MINICNN_DATA']}", Path(os.environ["MINICNN_DATA"])
    return None


def fashion_mnist_folders(root=None):
    """Where load_fashion_mnist looks, in order: root alone if given, else $MINICNN_DATA alone
    if set (each also in torchvision's layout FashionMNIST/raw inside it), else Debian's folder
    and the user cache."""
    explicit = _explicit(root)
    if explicit:
        return [explicit[1], explicit[1] / "FashionMNIST" / "raw"]
    return [Path(DEBIAN_FASHION_MNIST), USER_CACHE, USER_CACHE / "FashionMNIST" / "raw"]


def load_fashion_mnist(root=None):
    """-> ((x_train, y_train), (x_test, y_test), classes); x uint8 (N, 1, 28, 28), y int64.
    A folder named by root= or $MINICNN_DATA is used or refused, never replaced by another."""
    explicit, folders = _explicit(root), fashion_mnist_folders(root)
    found = [{key: _find_idx(folder, name) for key, name in IDX_FILES.items()} for folder in folders]
    paths = next((p for p in found if all(p.values())), None)
    if paths is None and explicit:
        what, folder = explicit
        if not folder.is_dir():
            raise FileNotFoundError(f"{what}: no such folder; pass the folder that holds the four "
                                    f"Fashion-MNIST IDX files ({', '.join(IDX_FILES.values())}, .gz or not)")
        best = max(found, key=lambda p: sum(v is not None for v in p.values()))
        missing = [IDX_FILES[key] for key, path in best.items() if path is None]
        raise FileNotFoundError(
            f"{what}: {folder} lacks {', '.join(missing)} (or .gz); it holds "
            f"{4 - len(missing)} of the 4 Fashion-MNIST IDX files. A folder you name is used or refused, "
            "never replaced: put the missing files there"
            + (", or unset MINICNN_DATA to use Debian's copy or the user cache." if root is None else "."))
    if paths is None:
        raise FileNotFoundError(
            "Fashion-MNIST not found in " + ", ".join(map(str, folders))
            + ". Get it with `apt-get install dataset-fashion-mnist` (Debian), or "
            "`python -m minicnn.data --download` (torchvision, needs internet), or put the four "
            "IDX files in a folder and pass root= or set MINICNN_DATA.")
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        x, y = arrays[split + "_x"], arrays[split + "_y"]
        if x.dim() != 3 or x.shape[1:] != (28, 28) or y.dim() != 1 or len(x) != len(y) or len(y) == 0:
            raise ValueError(f"{paths[split + '_x']}: images {tuple(x.shape)} and labels "
                             f"{tuple(y.shape)} do not make (N, 28, 28) images with N >= 1 labels")
        if int(y.max()) >= 10:
            raise ValueError(f"{paths[split + '_y']}: label {int(y.max())} is not one of 0..9")
    return ((arrays["train_x"].unsqueeze(1), arrays["train_y"].long()),
            (arrays["test_x"].unsqueeze(1), arrays["test_y"].long()), list(FASHION_MNIST_CLASSES))


def download_fashion_mnist(folder=USER_CACHE):
    """Fetch the IDX files through torchvision into the user cache (needs internet)."""
    import torchvision
    torchvision.datasets.FashionMNIST(str(folder), train=True, download=True)
    torchvision.datasets.FashionMNIST(str(folder), train=False, download=True)


def _per_class(counts, n, low, high):
    """n split over classes in proportion to counts (largest remainder), class c in [low[c], high[c]].
    Exact in integers: class c's quota n * counts[c] / total is compared as n * counts[c] vs take * total."""
    total = sum(counts)
    take = [min(max(n * c // total, lo), hi) for c, lo, hi in zip(counts, low, high)]
    while sum(take) < n:  # the largest shortfall quota - take first
        c = max((c for c in range(len(counts)) if take[c] < high[c]), key=lambda c: n * counts[c] - take[c] * total)
        take[c] += 1
    while sum(take) > n:  # the largest excess take - quota first
        c = max((c for c in range(len(counts)) if take[c] > low[c]), key=lambda c: take[c] * total - n * counts[c])
        take[c] -= 1
    return take


def _stratified(y, n, *, seed, keep_rest, what):
    """Indices of n samples, every class in proportion (largest remainder) and at least once,
    and (keep_rest) at least one of each class left over -> (chosen, rest), both in a random order."""
    y, n, seed = _labels(y), _count(n, what), _count(seed, "seed", low=0)
    if len(y) == 0:
        raise ValueError("y holds no labels: there is nothing to split")
    classes, counts = torch.unique(y, return_counts=True)
    classes, counts = classes.tolist(), counts.tolist()
    single = [k for k, c in zip(classes, counts) if c == 1]
    if keep_rest and single:
        raise ValueError(f"class(es) {single} have a single sample, which cannot be in both parts: "
                         "add samples of them or remove those classes")
    low, high = [1] * len(counts), [c - 1 if keep_rest else c for c in counts]
    if not sum(low) <= n <= sum(high):
        raise ValueError(f"{what}={n}: cannot take {n} of {len(y)} samples with all {len(counts)} classes in it"
                         + (" and in the rest" if keep_rest else "")
                         + f": choose {what} between {sum(low)} and {sum(high)}")
    take = dict(zip(classes, _per_class(counts, n, low, high)))
    seen = dict.fromkeys(take, 0)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    chosen = torch.zeros(len(y), dtype=torch.bool)
    for i, c in zip(order.tolist(), y[order].tolist()):  # the first take[c] of class c in the random order
        chosen[i] = seen[c] < take[c]
        seen[c] += 1
    chosen = chosen[order]  # in the random order
    return order[chosen], order[~chosen]


def train_valid_split(x, y, n_valid, *, seed=0):
    """Hold out n_valid samples, stratified: every class in both parts, in its share of the data
    (largest remainder), each part in a random order -> (x_train, y_train), (x_valid, y_valid)."""
    y = _pair(x, y)
    valid, train = _stratified(y, n_valid, seed=seed, keep_rest=True, what="n_valid")
    return (x[train], y[train]), (x[valid], y[valid])


def stratified_subset(x, y, n, *, seed=0):
    """n of the samples, every class present and in its share of the data, in a random order
    -> (x, y); all of them, as given, when n >= len(y). A slice x[:n] of class-sorted data
    holds few classes."""
    y, n = _pair(x, y), _count(n, "n")
    if n >= len(y):
        return x, y
    chosen, _ = _stratified(y, n, seed=seed, keep_rest=False, what="n")
    return x[chosen], y[chosen]


SUPPORTED = ", ".join(sorted(IMAGE_SUFFIXES))
CPP_SOURCE = re.compile(r"^[\w ]+, \S+:\d+, ")  # torchvision's "decode_png, /.../decode_png.cpp:42, "


def _entries(folder):
    """The entries of a folder, sorted; a folder that cannot be listed is named."""
    try:
        return sorted(folder.iterdir())
    except OSError as e:
        raise ValueError(f"{folder}: cannot list it ({e.strerror}); check that it is a readable folder") from e


def _is_image(p):
    # a dangling symlink counts, so that decoding names it instead of skipping it
    return p.suffix.lower() in IMAGE_SUFFIXES and (p.is_file() or (p.is_symlink() and not p.exists()))


def _describe(entries):
    """What a folder holds, counted by suffix: '.tif: 2, folder: 1'."""
    kinds = Counter("folder" if p.is_dir() else p.suffix.lower() or "no suffix" for p in entries)
    return ", ".join(f"{kind}: {n}" for kind, n in sorted(kinds.items())) or "nothing"


def _images_in(folder, problems, skipped, fix):
    """The image files of one folder; none is a problem, anything else is noted in skipped."""
    entries = _entries(folder)
    images, others = [p for p in entries if _is_image(p)], [p for p in entries if not _is_image(p)]
    if not images:
        problems.append(f"{folder}: no images (it holds {_describe(entries)}; supported: {SUPPORTED}); {fix}")
    elif others:
        skipped.append(f"{folder}: {_describe(others)}")
    return images


def _scan_split(split, problems, skipped, classes=None):
    """train/ or valid/ -> {class: [image files]}; what is wrong is appended to problems."""
    if not split.is_dir():
        problems.append(f"{split}: no such folder; expected {split.parent}/{split.name}/<class>/<image>")
        return {}
    entries = _entries(split)
    if [p for p in entries if not p.is_dir()]:
        skipped.append(f"{split}: {_describe([p for p in entries if not p.is_dir()])} outside the class folders")
    files = {d.name: _images_in(d, problems, skipped, "add images, convert them, or remove the folder")
             for d in entries if d.is_dir()}
    if classes is None and len(files) < 2:
        found = f"only the class {sorted(files)}" if files else f"no class folders (it holds {_describe(entries)})"
        problems.append(f"{split}: {found}; a classifier needs at least 2 classes, each a folder of images, "
                        f"{split}/<class>/<image>")
    if classes and sorted(files) != classes:
        problems.append(f"{split}: classes differ from train/: missing {sorted(set(classes) - set(files))}, "
                        f"extra {sorted(set(files) - set(classes))}")
    return files


def _decode(path, io):
    """One image file -> (uint8 (3, H, W), frames): 16-bit scaled to 8 bits, an animation's first frame."""
    if path.is_symlink() and not path.exists():
        raise ValueError(f"a symlink to {os.readlink(path)}, which does not exist")
    image, frames = io.decode_image(str(path), mode=io.ImageReadMode.RGB), 1  # (3, H, W), uint8 or uint16
    if image.dim() == 4:  # an animated GIF: (frames, 3, H, W)
        frames, image = len(image), image[0]
    if image.dtype == torch.uint16:  # 16-bit PNG: v8 = round(v16 * 255 / 65535)
        image = ((image.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
    return image, frames


def _load_images(paths, size, broken, animated):
    """Decode, make RGB, resize the short side to size, centre-crop -> uint8 (N, 3, size, size).
    A file that will not decode is appended to broken, an animation to animated."""
    import torchvision.transforms.v2.functional as TF
    with warnings.catch_warnings():  # torchvision 0.29 warns that torchcodec will take decoding over
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


def load_image_folder(path, size):
    """train/<class>/*, valid/<class>/* (and optional test/*) -> ImageFolder of uint8 tensors.
    The whole tree is checked before any image is decoded; every problem is named in one error."""
    size = _count(size, "size", low=1)
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
                          f"test/ holds unlabelled images directly, {path / 'test'}/<image>; or remove it")
    if problems:
        raise ValueError(f"{path}: cannot load this image folder:\n  " + "\n  ".join(problems))
    if skipped:
        warnings.warn(f"{path}: skipped what is not an image (supported: {SUPPORTED}): " + "; ".join(skipped),
                      stacklevel=2)
    broken, animated = [], []
    x_train, x_valid = [_load_images([p for c in classes for p in part[c]], size, broken, animated)
                        for part in (train, valid)]
    x_test = _load_images(test, size, broken, animated) if test else None
    if broken:  # every file that will not decode, in one error
        raise ValueError(f"{len(broken)} image(s) cannot be decoded; remove or replace them: " + "; ".join(broken))
    if animated:
        warnings.warn(f"{len(animated)} animated image(s), only the first frame of each is used: "
                      + ", ".join(animated), stacklevel=2)
    y_train, y_valid = [torch.tensor([label for label, c in enumerate(classes) for _ in part[c]])
                        for part in (train, valid)]
    return ImageFolder((x_train, y_train), (x_valid, y_valid), x_test, classes)


def normalize(x, mean, std):
    """(x - mean) / std per channel; x float (N, C, H, W), mean and std 1 or C numbers, std > 0."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        raise ValueError(f"normalize: x must be a float tensor (N, C, H, W), got "
                         + (f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__)
                         + ("; for uint8 images divide by 255 first, x.float() / 255 (Batches does it)"
                            if isinstance(x, torch.Tensor) and x.dtype == torch.uint8 else ""))
    stats = []
    for name, value in (("mean", mean), ("std", std)):
        try:
            t = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"normalize: {name}={value!r} is not a number or a sequence of numbers") from e
        if len(t) not in (1, x.shape[1]):
            raise ValueError(f"normalize: {name} has {len(t)} values but x has {x.shape[1]} channel(s): "
                             f"give 1 value or {x.shape[1]}, the statistics of these images' channels")
        if not torch.isfinite(t).all() or (name == "std" and (t <= 0).any()):
            raise ValueError(f"normalize: {name}={t.tolist()} must be finite" + (" and > 0" if name == "std" else ""))
        stats.append(t.to(dtype=x.dtype, device=x.device).view(1, -1, 1, 1))
    mean, std = stats
    return (x - mean) / std


class Batches:
    """Minibatches of (x, y) on a device; len() = batches per epoch; iterate for one epoch.
    x: (N, ...) uint8 images (x / 255 on the device) or float features; y: (N,) integer
    labels (as int64) or None."""

    def __init__(self, x, y, batch_size, *, shuffle, generator=None, device="cpu", drop_last=False):
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or len(x) == 0:
            raise ValueError("Batches: x must be a tensor of N >= 1 samples, (N, C, H, W) images or (N, F) "
                             "features, got " + (f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor)
                                                 else type(x).__name__))
        if x.dtype != torch.uint8 and x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"Batches: x is {x.dtype}; pass uint8 images in 0..255 or float32 in [0, 1] "
                             "(x.float(); models here are float32)")
        if y is not None:
            y = _pair(x, y).long()
        batch_size = _count(batch_size, "batch_size", low=1)
        for name, flag in (("shuffle", shuffle), ("drop_last", drop_last)):
            if not isinstance(flag, bool):
                raise ValueError(f"Batches: {name} must be True or False, got {flag!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"Batches: generator must be a torch.Generator or None, got {generator!r}; "
                             "for a seed, pass torch.Generator().manual_seed(seed)")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"Batches: device={device!r} is not a device ({e})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"Batches: device={str(device)!r} but CUDA is not available here; use device='cpu'")
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.device, self.drop_last = device, drop_last
        # One seed drawn now; epoch e's order is randperm seeded with (seed, e).
        self.seed = int(torch.randint(2**62, (1,), generator=generator))
        self.epochs_seen = 0

    def __len__(self):
        full, rest = divmod(len(self.x), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def order(self, epoch):
        epoch = _count(epoch, "epoch", low=0)
        if not self.shuffle:
            return torch.arange(len(self.x))
        return torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed + epoch))

    def epoch(self, epoch, *, skip=0):
        """Yield epoch `epoch`'s minibatches, the first `skip` of them left out."""
        order, skip = self.order(epoch), _count(skip, "skip", low=0)
        if skip > len(self):
            raise ValueError(f"skip={skip} is past the {len(self)} batches of an epoch")
        for i in range(skip, len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            xb = self.x[index].to(self.device, non_blocking=True)
            if xb.dtype == torch.uint8:
                xb = xb.float().div_(255)  # (B, C, H, W) in [0, 1]
            yb = None if self.y is None else self.y[index].to(self.device, non_blocking=True)
            yield xb, yb

    def __iter__(self):
        self.epochs_seen += 1
        return self.epoch(self.epochs_seen - 1)


def main(argv=None):
    """`python -m minicnn.data [--download]`, run by `make data`: exit 0 when Fashion-MNIST is found."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m minicnn.data", description="Find (or fetch) Fashion-MNIST.")
    parser.add_argument("--download", action="store_true", help=f"fetch it through torchvision into {USER_CACHE}")
    if parser.parse_args(argv).download:
        download_fashion_mnist()
    try:
        (x_train, _), (x_test, _), _ = load_fashion_mnist()
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"minicnn.data: {e}") from None  # exit 1, the message and no traceback
    print(f"Fashion-MNIST: {len(x_train)} training and {len(x_test)} test images")


if __name__ == "__main__":
    main()
