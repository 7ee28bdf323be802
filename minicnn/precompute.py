"""Precomputed activations: run a frozen body over the data once, cache the result, train the head on it.

While the body is frozen it is a fixed function, so its output for an image never changes:
    features = body(x)                 once, in eval mode under no_grad, (N, F), cached on disk
    for each epoch: logits = head(features[batch])      instead of head(body(x[batch]))
Training the head then costs a few small matrix products a batch instead of a forward pass
through millions of convolution weights (benchmarks/bench_precompute.py measures how much).
The head is trained with the ordinary loop, train.fit, on Batches of features
(data.batches takes float tensors as they are). Its modules are the model's own, so
afterwards the full model gives the same predictions on un-augmented images.

Why augmentation has no effect here: the features were computed from the plain images, once;
an augmented image would need a new pass through the body, which is the cost precomputing
removes. Every epoch the head sees exactly the same inputs, so it overfits sooner. Step 4 of
the recipe therefore turns precomputing off: each batch goes through the frozen body again,
now augmented, so the head sees new versions of each image every epoch (fastai 0.7:
`learn.precompute = False`). The body must run in eval mode for the features to match what
it computes later (BatchNorm with its running statistics: freeze.freeze(train_bn=False)).

The cache key: an architecture name, the image size, a hash of the images and a hash of the
body's weights (so a body with other weights, e.g. unfrozen and trained, never reuses stale
features). Same key: the features are loaded instead of computed.
Source: fastai 0.7 (`ConvLearner.pretrained(..., precompute=True)`), which cached the
concatenated average- and max-pooled body output as bcolz arrays under tmp/<arch>_<size>.
Differs: one .pt file per key, written atomically; pooling is part of `body_and_head`'s body.
"""
import hashlib
import os
from pathlib import Path

import torch
from torch import nn


def body_and_head(model, *, n_pool=2):
    """Split a grouped model into (body, head) that share its modules.

    body = every layer group but the last, then the last group's first `n_pool` modules
    (pooling and flatten: no parameters); head = the rest of the last group. Training
    `head` trains the model's own head. Needs model.layer_groups[-1] to be an nn.Sequential.
    """
    groups = list(getattr(model, "layer_groups", []))
    if not groups or not isinstance(groups[-1], nn.Sequential):
        raise TypeError("body_and_head needs model.layer_groups whose last group is an nn.Sequential "
                        "(pooling first), as minicnn.models builds them")
    pool, head = groups[-1][:n_pool], groups[-1][n_pool:]
    if any(True for _ in pool.parameters()):
        raise ValueError(f"the head's first {n_pool} modules have parameters, so their output is not fixed "
                         "while the head trains; choose n_pool so that only pooling/flatten come first")
    return nn.Sequential(*groups[:-1], *pool), head


def data_hash(x):
    """A short hash of a tensor's shape, dtype and values (blake2b, 16 hex digits)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{tuple(x.shape)} {x.dtype}".encode())
    h.update(x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(arch, x, body):
    """'<arch>-<H>x<W>-data<hash of x>-weights<hash of the body's parameters and buffers>'."""
    h = hashlib.blake2b(digest_size=4)
    for name, value in body.state_dict().items():
        h.update(name.encode() + data_hash(value).encode())
    return f"{arch}-{x.shape[-2]}x{x.shape[-1]}-data{data_hash(x)}-weights{h.hexdigest()}"


def precompute_features(body, x, *, batch_size, cache=None, arch=None, device=None):
    """body(x) for all of x, batch by batch, in eval mode under no_grad -> float32 (N, ...) on the CPU.

    x: (N, C, H, W) images, uint8 (divided by 255 here, as data.batches does) or float in [0, 1].
    cache: a folder; with it (and `arch`, the name that goes in the key) the features are
    saved to <cache>/<key>.pt and loaded from there next time the key matches.
    device: where the body runs (default: where its parameters are). Its mode is restored.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if x.dim() != 4 or len(x) == 0:
        raise ValueError(f"x must be a non-empty (N, C, H, W) batch of images, got shape {tuple(x.shape)}")
    path = None
    if cache is not None:
        if not arch:
            raise ValueError("with cache=, give arch= (the body's name, e.g. 'efficientnet_lite0'): it is "
                             "part of the cache key")
        path = Path(cache) / f"{cache_key(arch, x, body)}.pt"
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
    if device is None:
        device = next(body.parameters(), torch.empty(0)).device  # a body without weights runs on the CPU
    was_training = body.training
    body.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size].to(device)
            xb = xb.float() / 255 if xb.dtype == torch.uint8 else xb.float()  # (B, C, H, W) in [0, 1]
            out.append(body(xb).float().cpu())
    body.train(was_training)
    features = torch.cat(out)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + f".{os.getpid()}.partial")
        torch.save(features, partial)
        os.replace(partial, path)  # atomic: a crash never leaves a half-written cache file
    return features
