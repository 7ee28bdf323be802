"""Checkpoints that resume a run exactly: everything the next step depends on, written atomically.

What the next training step depends on, and where it is kept here:
    weights and BatchNorm statistics     model.state_dict()
    momentum buffers, group LRs          optimizer.state_dict()
    the schedule's position              step (the LR is a pure function of it)
    which layers are frozen              requires_grad of every named parameter
    dropout, torch.rand* in user code    torch's global RNG (and every CUDA device's)
    augmentation, sampling               the torch.Generators passed as `generators`
    random / numpy in user code          Python's and numpy's global RNG
The data order needs nothing: minicnn's Batches draws epoch e's order from (seed, e), so
fit(start_step=k) sees the same batches as the run that was never stopped. Code is not
state: freeze.py's eval-mode hooks for BatchNorm (train_bn=False) are not saved, so call
the same freeze_to(...) before loading, as the saved run did before it trained.

Atomic write: torch.save into a temporary file in the same folder, flush + fsync, then
os.replace onto the target (a rename: all or nothing on POSIX and Windows), then fsync the
folder so the rename itself survives a power cut. A crash at any point leaves either the
old checkpoint or the new one at `path`, never half a file.

Sources: PyTorch's "Saving and loading a general checkpoint" recipe (model + optimizer +
epoch); the write-fsync-rename idiom of databases and editors.
How it differs: the PyTorch recipe saves no RNG state and no freeze state (a resumed run
draws different dropout masks and augmentations, and may train layers that were frozen);
fastai's Learner.save writes model + optimizer, not atomically. Loading uses
weights_only=True (no arbitrary code from a file), so `extra` must be plain data: numbers,
strings, lists, dicts, tensors (dataclasses.asdict(history) for a History).
"""
import os
import random
import secrets
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch

FORMAT = "minicnn-checkpoint-1"
Resumed = namedtuple("Resumed", "step extra")


def _rng_states():
    state = np.random.get_state()  # ("MT19937", keys uint32 (624,), pos, has_gauss, cached_gaussian)
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,  # used at all?
            "python": random.getstate(),
            "numpy": (state[0], torch.from_numpy(state[1].astype(np.int64)), *state[2:])}


def _set_rng_states(states):
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():  # on a CPU-only machine: not needed
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def _check_generators(generators):
    if generators is None:
        return {}
    if not isinstance(generators, dict) or not all(isinstance(g, torch.Generator) for g in generators.values()):
        raise TypeError("generators must be a dict {name: torch.Generator}, e.g. {'augment': g}")
    return generators


def _fsync_folder(folder):
    if os.name == "nt":  # Windows cannot open a folder for fsync; its rename is durable enough
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path, *, model, optimizer, step, extra=None, generators=None):
    """Write a checkpoint to `path` atomically; `step` = steps done = fit's start_step on resume.

    generators: {name: torch.Generator} whose states to save (augmentation, sampling).
    extra: plain data to keep alongside (history, args); given back by load_checkpoint.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be the number of steps done (an int >= 0), got {step!r}")
    checkpoint = {
        "format": FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "rng": _rng_states(),
        "generators": {name: g.get_state() for name, g in _check_generators(generators).items()},
        "extra": extra,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temporary file must be in the same folder: os.replace is atomic only within one file system
    # (not tempfile.mkstemp: its 0600 mode would survive the rename; here the umask applies, as for open())
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def _check_architecture(path, saved, own):
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [f"{k}: saved {tuple(saved[k].shape)}, model {tuple(own[k].shape)}"
              for k in own if k in saved and saved[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def listed(names):
            return ", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "") or "none"
        raise ValueError(f"{path} was saved from a different architecture: missing keys: {listed(missing)}; "
                         f"unexpected keys: {listed(unexpected)}; shape mismatches: {listed(shapes)}. "
                         "Build the model with the same function and arguments as the saved run.")


def load_checkpoint(path, *, model, optimizer, generators=None):
    """Restore what save_checkpoint wrote -> Resumed(step, extra); then fit(..., start_step=step).

    Build model and optimizer as the saved run did (same architecture, same param groups);
    nothing is changed if the architecture differs. generators: {name: torch.Generator},
    the same names as at saving time.
    """
    generators = _check_generators(generators)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(f"{path} is not a minicnn checkpoint (written by save_checkpoint); for bare "
                         "weights use model.load_state_dict(torch.load(path))")
    _check_architecture(path, checkpoint["model"], model.state_dict())
    missing = sorted(set(generators) - set(checkpoint["generators"]))
    if missing:
        raise ValueError(f"{path} holds no state for generators {missing}; it has "
                         f"{sorted(checkpoint['generators'])}")
    cuda = checkpoint["rng"]["cuda"]
    if cuda is not None and torch.cuda.is_available() and len(cuda) != torch.cuda.device_count():
        raise ValueError(f"{path} holds RNG states of {len(cuda)} CUDA devices, this machine has "
                         f"{torch.cuda.device_count()}; an exact resume needs the same devices")
    # the optimizer checks its groups before it changes anything; after it nothing can fail
    optimizer.load_state_dict(checkpoint["optimizer"])
    model.load_state_dict(checkpoint["model"])  # copies into the same Parameters, on their device
    for name, p in model.named_parameters():
        p.requires_grad_(checkpoint["requires_grad"][name])
    _set_rng_states(checkpoint["rng"])
    for name, g in generators.items():
        g.set_state(checkpoint["generators"][name])
    return Resumed(checkpoint["step"], checkpoint["extra"])
