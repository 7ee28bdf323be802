"""Precomputed activations: run a frozen body over the data once, cache the result, train the
head on it.

While the body is frozen it is a fixed function, so its output for an image never changes:
    features = body(x)                 once, in eval mode under no_grad, (N, F), cached on disk
    each step: logits = head(features[batch])      instead of head(body(x[batch]))
The cache file, <cache>/<arch>-<H>x<W>-data<hash of x>-weights<hash of the body>.pt, is written
and checked with minicnn/checkpoint.py (atomic, sha256); a cache file that is damaged or does not
match x and the body is recomputed, with a warning. Float images are checked by check_images of
minicnn/augment.py.
Source: fastai 0.7, ConvLearner.pretrained(..., precompute=True). docs/precompute.md: why
augmentation does nothing here, how it differs from fastai, the speed measured.
Copied out, it needs minicnn/checkpoint.py, minicnn/atomic.py and minicnn/augment.py beside it.
"""
import hashlib
import inspect
import warnings
from pathlib import Path

import torch
from torch import nn

from minicnn.augment import check_images
from minicnn.checkpoint import load_checked, save_checked

FORMAT = "minicnn-features-1"


def body_and_head(model, *, n_pool=2):
    """Split a grouped model into (body, head) that share its modules.

    body = every layer group but the last, then the last group's first `n_pool` modules
    (pooling and flatten: no parameters); head = the rest of the last group. Training
    `head` trains the model's own head. Needs model.layer_groups[-1] to be an nn.Sequential.
    """
    groups = list(model.layer_groups)
    pool, head = groups[-1][:n_pool], groups[-1][n_pool:]
    if any(True for _ in pool.parameters()):  # else the body holds weights the head should train
        raise ValueError(f"n_pool={n_pool} moves layers with weights into the body; lower it")
    return nn.Sequential(*groups[:-1], *pool), head


def data_hash(x):
    """A short hash of a tensor's shape, dtype and values (blake2b, 16 hex digits)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{tuple(x.shape)} {x.dtype}".encode())
    h.update(x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(arch, x, body):
    """'<arch>-<H>x<W>-data<hash of x>-weights<hash of the body: its modules, their code, its
    weights, buffers>'."""
    h = hashlib.blake2b(digest_size=4)
    # its modules: another pooling with the same weights is another body
    h.update(repr(body).encode())
    # their code: an edited forward() too
    for kind in dict.fromkeys(type(m) for m in body.modules()):
        try:
            h.update(inspect.getsource(kind).encode())
        except (OSError, TypeError):  # defined where no source file is kept (interactive session)
            h.update(f"{kind.__module__}.{kind.__qualname__}".encode())
    for name, value in body.state_dict().items():
        h.update(name.encode() + data_hash(value).encode())
    return f"{arch}-{x.shape[-2]}x{x.shape[-1]}-data{data_hash(x)}-weights{h.hexdigest()}"


def _run(body, x, batch_size, device):
    """body(x) batch by batch, eval mode, no_grad -> float32 (N, ...) on the CPU; every
    module's mode restored."""
    modes = [(m, m.training) for m in body.modules()]
    body.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                xb = x[start:start + batch_size].to(device)
                # (B, C, H, W) in [0, 1]
                xb = xb.float() / 255 if xb.dtype == torch.uint8 else xb.float()
                try:
                    out.append(body(xb).float().cpu())  # features = body(x), (B, F) each
                except RuntimeError as error:  # e.g. 3-channel images, a 1-channel stem
                    raise ValueError(f"body(x), x {tuple(x.shape)}: {error}") from error
    finally:
        for module, training in modes:
            module.training = training
    return torch.cat(out)


def _cached(path, key, x):
    """The features in `path` if the file is intact and holds this key's features for x, else
    None (said out loud)."""
    try:
        saved = load_checked(path, FORMAT, "feature cache")
    except ValueError as error:
        warnings.warn(f"{error} Recomputing the features.", stacklevel=3)
        return None
    features = saved["features"]
    if (saved["key"] == key and features.dtype == torch.float32
            and len(features) == len(x) == saved["rows"]):
        return features
    warnings.warn(f"the feature cache {path} does not match x {tuple(x.shape)}: it holds "
                  f"{len(features)} rows of {features.dtype} for key {saved['key']}; "
                  "recomputing the features", stacklevel=3)
    return None


def precompute_features(body, x, *, batch_size, cache=None, arch=None, device=None):
    """body(x) for all of x, batch by batch, in eval mode under no_grad -> float32 (N, ...) on
    the CPU.

    x: (N, C, H, W) images, uint8 (divided by 255 here, as data.Batches does) or float in [0, 1].
    cache: a folder; with it (and `arch`, the name that goes in the key) the features are
    saved to <cache>/<key>.pt and loaded from there next time the key matches.
    device: where the body runs (default: where its parameters are). Every module's mode is
    restored.
    """
    if x.dtype != torch.uint8:  # float: in [0, 1]; 0..255 floats would give wrong features
        check_images(x)
    if x.dim() != 4 or len(x) == 0 or batch_size < 1:  # else an empty or unbatched pass
        raise ValueError(f"need images x (N, C, H, W), N >= 1, and batch_size >= 1, got "
                         f"{tuple(x.shape)}, batch_size={batch_size}")
    if device is None:
        # a body without weights runs on the CPU
        device = next(body.parameters(), torch.empty(0)).device
    path = None
    if cache is not None:
        if not arch or Path(arch).name != arch:  # the file's name, in the cache folder
            raise ValueError(f"with cache=, arch= must name the body (no folders), got {arch!r}")
        Path(cache).mkdir(parents=True, exist_ok=True)  # a file there fails now, not after the pass
        key = cache_key(arch, x, body)
        path = Path(cache) / f"{key}.pt"
        if path.exists() and (features := _cached(path, key, x)) is not None:
            return features
    features = _run(body, x, batch_size, device)
    if path is not None:  # atomic: a crash never leaves a half-written cache file
        save_checked(path, FORMAT, {"features": features, "key": key, "rows": len(x)})
    return features
