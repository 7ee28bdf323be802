"""Fashion-MNIST from its four IDX files, found on this machine: no internet at run time.

IDX: bytes 0 0 8 D, then D big-endian uint32 sizes, then the uint8 values. Looked for in
root= or $MINICNN_DATA alone when given (a folder you name is used or refused, never
replaced), else in Debian's `dataset-fashion-mnist` folder and the user cache. Gives
x uint8 (N, 1, 28, 28) and y int64 (N,). `python -m minicnn.fashion_mnist [--download]`
(`make data`) says whether it is found, or fetches it through torchvision.

Source: the IDX format of yann.lecun.com/exdb/mnist; Zalando's Fashion-MNIST (Xiao et al.,
2017). What is refused, and why: docs/data.md.
"""
import gzip
import os
from pathlib import Path

import torch

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Per-channel statistics of the 60,000 training images, on [0, 1] pixels.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
USER_CACHE = (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
              / "minicnn" / "fashion-mnist")
IDX_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
             "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}


def read_idx(path):
    """One IDX file -> uint8 tensor of the shape its header gives; errors name the file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip raises these for truncated or non-gzip files
        raise ValueError(f"{path}: cannot read ({e}); delete it and fetch it again") from e
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":  # 0x08: unsigned bytes
        raise ValueError(f"{path}: not an IDX file of uint8 (magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    # D sizes, big-endian uint32 each (a short header reads as too few bytes below)
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(torch.tensor(shape).prod())
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, its header says {expected}: truncated?")
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
    found = [{key: _find_idx(folder, name) for key, name in IDX_FILES.items()}
             for folder in folders]
    paths = next((p for p in found if all(p.values())), None)
    if paths is None and explicit:  # used or refused, never replaced by another folder
        what, folder = explicit
        if not folder.is_dir():
            raise FileNotFoundError(f"{what}: no such folder")
        best = max(found, key=lambda p: sum(v is not None for v in p.values()))
        missing = [IDX_FILES[key] for key, path in best.items() if path is None]
        raise FileNotFoundError(f"{what}: lacks {', '.join(missing)} (or .gz); put them there"
                                + (", or unset MINICNN_DATA" if root is None else ""))
    if paths is None:
        raise FileNotFoundError(f"Fashion-MNIST not in {', '.join(map(str, folders))}: "
                                "apt-get install dataset-fashion-mnist, or python -m "
                                "minicnn.fashion_mnist --download, or pass root=")
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        x, y = arrays[split + "_x"], arrays[split + "_y"]
        # (N, 28, 28) images, N labels 0..9: else a mixed-up file would train on wrong pairs
        top = int(y.max()) if len(y) else None
        if x.shape[1:] != (28, 28) or y.shape != (len(x),) or top is None or top > 9:
            raise ValueError(f"{paths[split + '_x']}, {paths[split + '_y']}: {tuple(x.shape)} "
                             f"images, {tuple(y.shape)} labels up to {top}; want N >= 1, 0..9")
    return ((arrays["train_x"].unsqueeze(1), arrays["train_y"].long()),
            (arrays["test_x"].unsqueeze(1), arrays["test_y"].long()), list(FASHION_MNIST_CLASSES))


def download_fashion_mnist(folder=USER_CACHE):
    """Fetch the IDX files through torchvision into the user cache (needs internet)."""
    import torchvision
    torchvision.datasets.FashionMNIST(str(folder), train=True, download=True)
    torchvision.datasets.FashionMNIST(str(folder), train=False, download=True)


def main(argv=None):
    """`python -m minicnn.fashion_mnist [--download]`, run by `make data`: exit 0 when
    Fashion-MNIST is found."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m minicnn.fashion_mnist",
                                     description="Find (or fetch) Fashion-MNIST.")
    parser.add_argument("--download", action="store_true",
                        help=f"fetch it through torchvision into {USER_CACHE}")
    if parser.parse_args(argv).download:
        download_fashion_mnist()
    try:
        (x_train, _), (x_test, _), _ = load_fashion_mnist()
    except (FileNotFoundError, ValueError) as e:
        # exit 1, the message and no traceback
        raise SystemExit(f"minicnn.fashion_mnist: {e}") from None
    print(f"Fashion-MNIST: {len(x_train)} training and {len(x_test)} test images")


if __name__ == "__main__":
    main()
