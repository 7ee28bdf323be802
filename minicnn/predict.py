"""Predict the classes of new images with a model exported by minicnn/export.py: fastai's
load_learner(path).predict(image), for many images at once.

    python -m minicnn.predict model.pt IMAGE_OR_FOLDER... [--tta] [--top K] [--csv out.csv]

Each image is decoded, resized and centre-cropped exactly as minicnn/image_folder.py loads a
training folder (RGB; 16-bit scaled to 8 bits; made grey for a 1-channel model), at the size
stored in model.pt, then x = pixels / 255 goes through the model (which normalises inside)
in batches:
    p = softmax(model(x))                                   minicnn/train.py's predict
    --tta: p = (p_plain + p_aug_1 + ... + p_aug_4) / 5      minicnn/tta.py, the stored preset
A folder gives a CSV (minicnn/atomic.py writes it), --device is read by minicnn/data.py, and
an image that will not decode is named and skipped. Source: fast.ai 2018 lesson 2
(learn.predict, learn.TTA). Not a piece to copy alone: take the package. docs/export.md.
"""
import argparse
import csv
import io
import sys
import time
import warnings
from pathlib import Path

import torch

from minicnn.atomic import atomic_write
from minicnn.data import parse_device
from minicnn.export import load_model
from minicnn.image_folder import IMAGE_SUFFIXES, load_images
from minicnn.train import predict
from minicnn.tta import predict_tta

TTA_VIEWS = 4  # augmented views besides the plain one: the course's learn.TTA()
TTA_SEED = 0  # the views are drawn from a generator seeded with it: the same result every run


def predict_images(model, info, paths, *, tta=False, batch_size=64, device=None):
    """-> (probabilities (N, n_classes) float32 on the CPU, the N paths read, the failures).

    model, info: what export.load_model gives. paths: image files, predicted batch_size at a
    time on `device` (None: where the model is; else the model is moved there). tta: average
    the plain view and TTA_VIEWS views of info["preset"], drawn from a seeded generator.
    failures: "path (why)" for each file that would not decode; those are skipped.
    """
    if batch_size < 1:  # range() would give no batch, or refuse a step of 0
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if tta and info.get("preset") is None:
        raise ValueError("tta=True: this model was exported without its augmentation preset")
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(TTA_SEED) if tta else None
    probs, read, failures = [], [], []
    for start in range(0, len(paths), batch_size):
        x, done = read_images(paths[start:start + batch_size], info["size"], info["channels"],
                              failures)
        if x is None:
            continue
        x = x.to(device).float().div_(255)  # (B, C, size, size) in [0, 1], as Batches makes it
        if tta:
            probs.append(predict_tta(model, [(x, None)], augment=info["preset"],
                                     n_aug=TTA_VIEWS, generator=generator))
        else:
            probs.append(predict(model, [(x, None)]))
        read += done
    n_classes = len(info["classes"])
    return (torch.cat(probs) if probs else torch.zeros(0, n_classes)), read, failures


def images_in(folder):
    """The image files under `folder` (sub-folders too), sorted by path."""
    return sorted(p for p in Path(folder).rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_images(paths, size, channels, failures):
    """Decode, make RGB, resize the short side to size, centre-crop (image_folder's own code),
    grey for channels=1 -> uint8 (N, channels, size, size) and the paths read; a file that will
    not decode is appended to failures as "path (why)"."""
    images, read, animated = [], [], []
    for path in paths:
        broken = []  # one image at a time: load_images gives None for a list with a broken one
        image = load_images([Path(path)], size, broken, animated)  # (1, 3, size, size)
        failures += broken
        if image is not None:
            images.append(image)
            read.append(path)
    if animated:
        warnings.warn("only the first frame is used of: " + ", ".join(animated), stacklevel=3)
    if not images:
        return None, read
    x = torch.cat(images)
    if channels == 1:  # grey = round(0.299 R + 0.587 G + 0.114 B), as PIL's convert("L")
        luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        x = (x.float() * luma).sum(1, keepdim=True).round().to(torch.uint8)  # (N, 1, H, W)
    return x, read


def _parse_args(argv):
    """The options, every one checked before any work (argparse's errors, exit 2), and the
    model -> (args, model, info)."""
    parser = argparse.ArgumentParser(
        prog="python -m minicnn.predict",
        description="Predict the classes of images with a model.pt that a lesson exported; a "
                    "folder stands for every image in it and its predictions go to a CSV.")
    parser.add_argument("model", type=Path,
                        help="the model.pt a lesson wrote into its --out (or that folder)")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE_OR_FOLDER",
                        help=f"image files ({', '.join(sorted(IMAGE_SUFFIXES))}) or folders "
                             "of them (searched recursively)")
    parser.add_argument("--tta", action="store_true",
                        help=f"test-time augmentation: the plain view and {TTA_VIEWS} views of "
                             "the training augmentation, averaged (slower, often better)")
    parser.add_argument("--top", type=int, default=3,
                        help="how many classes to print per image, most likely first (default 3)")
    parser.add_argument("--csv", type=Path,
                        help="write every prediction to this CSV (default: predictions.csv in "
                             "the current folder when a folder is given)")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device,
                        help="where to predict (default: cuda when there is a GPU, else cpu; "
                             f"here {default_device})")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per forward pass (default 64)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.images if not p.exists()]
    if missing:
        parser.error(f"argument IMAGE_OR_FOLDER: no such file or folder: {', '.join(missing)}")
    for name in ("top", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"argument --{name.replace('_', '-')}: must be >= 1, "
                         f"got {getattr(args, name)}")
    if args.csv is not None and args.csv.is_dir():
        parser.error(f"argument --csv: {args.csv} is a folder; give a file name, "
                     f"e.g. {args.csv / 'predictions.csv'}")
    if args.csv is not None and args.csv.parent.exists() and not args.csv.parent.is_dir():
        parser.error(f"argument --csv: {args.csv.parent} is a file, not a folder")
    try:
        device = parse_device(args.device)
    except ValueError as error:
        parser.error(f"argument --device: {error}")
    try:  # a missing, damaged or foreign file (a folder: its model.pt)
        model, info = load_model(args.model, device)
    except (OSError, ValueError) as error:
        parser.error(f"argument model: {error}")
    if args.tta and info["preset"] is None:
        parser.error("argument --tta: this model was exported without its augmentation preset")
    return args, model, info


def _csv_text(paths, probs, classes):
    """path, predicted class, its probability, then one column per class."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "prediction", "probability", *classes])
    for path, p in zip(paths, probs.tolist()):
        best = max(range(len(p)), key=p.__getitem__)
        writer.writerow([path, classes[best], f"{p[best]:.6f}", *(f"{v:.6f}" for v in p)])
    return out.getvalue()


def main(argv=None):
    """python -m minicnn.predict: print each image's top classes; a CSV for folders or --csv."""
    args, model, info = _parse_args(argv)
    paths = [p for given in args.images for p in (images_in(given) if given.is_dir() else [given])]
    started = time.perf_counter()
    probs, read, failures = predict_images(model, info, paths, tta=args.tta,
                                           batch_size=args.batch_size)
    if failures:
        print(f"skipped {len(failures)} image(s) that will not decode:\n  "
              + "\n  ".join(failures), file=sys.stderr)
    if not read:
        raise SystemExit(f"minicnn.predict: none of the {len(paths)} image(s) could be read")
    classes, top = info["classes"], min(args.top, len(info["classes"]))
    for path, p in zip(read, probs):
        values, indices = p.topk(top)
        print(f"{path}: " + ", ".join(f"{classes[i]} {v:.3f}"
                                      for v, i in zip(values.tolist(), indices.tolist())))
    print(f"{len(read)} image(s) in {time.perf_counter() - started:.1f}s on {args.device}"
          + (f", TTA ({TTA_VIEWS} views + plain)" if args.tta else ""), file=sys.stderr)
    if args.csv is not None or any(given.is_dir() for given in args.images):
        csv_path = args.csv or Path("predictions.csv")
        atomic_write(csv_path, _csv_text(read, probs, classes))
        print(f"wrote {csv_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
