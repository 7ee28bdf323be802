"""Checkpoints that resume a run exactly, written atomically and checked when read back.

A checkpoint holds everything the next step depends on: weights and BatchNorm statistics,
the optimizer's state and class, the step (the LR is a function of it), requires_grad of
every parameter, and the RNG states (torch, CUDA, Python, numpy, the Generators given).
Write:  torch.save to memory -> minicnn/atomic.py's atomic_write (temporary file, fsync,
        os.replace: a crash leaves the old file or the new one, never half of one).
Check:  sha256 over every value saved, stored in the file, recomputed on load.
Source: PyTorch's recipe "Saving and loading a general checkpoint".
docs/checkpoints.md: what a crash can cost, and what not.
Copied out, it needs minicnn/atomic.py beside it.
"""
import hashlib
import io
import random
from collections import OrderedDict, namedtuple
from pathlib import Path

import numpy as np
import torch

from minicnn.atomic import atomic_write

FORMAT = "minicnn-checkpoint-2"  # 1: no checksum, no optimizer class
Resumed = namedtuple("Resumed", "step extra")


def save_checkpoint(path, *, model, optimizer, step, extra=None, generators=None):
    """Write a checkpoint to `path` atomically; `step` = steps done = fit's start_step on resume.

    generators: {name: torch.Generator} whose states to save (augmentation, sampling).
    extra: plain data to keep alongside (numbers, strings, lists, dicts, tensors), given back
    by load_checkpoint; anything else is refused, naming it, before a file is touched.
    """
    if type(step) is not int or step < 0:  # a wrong step resumes the LR schedule elsewhere
        raise ValueError(f"step must be an int >= 0 (the steps done), got {step!r}")
    contents = {
        "extra": extra,  # first: the likeliest to be refused, and named in the error as extra[...]
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "optimizer_class": _class_name(optimizer),
        "step": step,
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "rng": _rng_states(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    return save_checked(path, FORMAT, contents)


def load_checkpoint(path, *, model, optimizer, generators=None):
    """Restore what save_checkpoint wrote -> Resumed(step, extra); then fit(..., start_step=step).

    Build model and optimizer as the saved run did (same architecture, same optimizer class,
    same param groups); nothing is changed if they differ or the file is damaged.
    generators: {name: torch.Generator}, the same names as at saving time.
    """
    checkpoint = load_checked(path, FORMAT, "checkpoint")
    _check_fits(path, checkpoint, model, optimizer)
    # read before anything changes: a KeyError names a generator the checkpoint does not hold
    generator_states = {name: checkpoint["generators"][name] for name in generators or {}}
    # the optimizer checks its groups before it changes anything; after it nothing can fail
    optimizer.load_state_dict(checkpoint["optimizer"])
    model.load_state_dict(checkpoint["model"])  # copies into the same Parameters, on their device
    for name, p in model.named_parameters():
        p.requires_grad_(checkpoint["requires_grad"][name])
    _set_rng_states(checkpoint["rng"])
    for name, state in generator_states.items():
        generators[name].set_state(state)
    return Resumed(checkpoint["step"], checkpoint["extra"])


def _rng_states():
    state = np.random.get_state()  # ("MT19937", keys uint32 (624,), pos, has_gauss, gaussian)
    return {"torch": torch.get_rng_state(),
            # None when CUDA was never used in this process
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "python": random.getstate(),
            "numpy": (state[0], torch.from_numpy(state[1].astype(np.int64)), int(state[2]),
                      int(state[3]), float(state[4]))}


def _set_rng_states(states):
    torch.set_rng_state(states["torch"])
    # each CUDA device this machine has too (none on a CPU-only one)
    for device, state in enumerate((states["cuda"] or [])[:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(state, device)
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def _class_name(optimizer):
    return f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"


def save_checked(path, fmt, contents):
    """atomic_save {format, sha256, contents}; contents is checked to be plain data before
    anything is written."""
    return atomic_save({"format": fmt, "sha256": checksum(contents), "contents": contents}, path)


def load_checked(path, fmt, what):
    """The contents save_checked wrote; a missing, damaged, foreign, older or newer file is
    refused with its name (FileNotFoundError, ValueError)."""
    path, advice = Path(path), f"Use an earlier {what}, or make this one again."
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file at {path}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, zero bytes, flipped bits, not torch.save's
        raise ValueError(f"{path} cannot be read as a {what}: it is damaged. {advice}") from error
    if not isinstance(saved, dict) or saved.get("format") != fmt:  # older ones: no checksum
        raise ValueError(f"{path} is not a minicnn {what} (foreign, newer or older). {advice}")
    try:  # a flipped bit can also drop a key, or turn a value into one that cannot be hashed
        same = (isinstance(saved.get("contents"), dict)
                and checksum(saved["contents"]) == saved.get("sha256"))
    except TypeError:
        same = False
    if not same:
        raise ValueError(f"{path} is damaged: its values do not match their sha256. {advice}")
    return saved["contents"]


def checksum(contents):
    """sha256 (hex) of a dict of plain data, {name: value}; TypeError naming the first value
    that torch.load(weights_only=True) could not read back."""
    h = hashlib.sha256()
    for name, value in contents.items():
        _feed(h, name, "a name")
        _feed(h, value, name)
    return h.hexdigest()


def _feed(h, value, where):
    """Hash `value` into h, tagged by type and length (so [1, 23] and [12, 3] differ)."""
    kind = type(value)
    if value is None or kind in (bool, int, float, str, bytes):
        text = value.hex() if kind is float else str(value)  # float.hex: every bit, -0.0 too
        raw = value if kind is bytes else text.encode("utf-8", "surrogatepass")
        h.update(f"{kind.__name__}:{len(raw)}:".encode() + raw)
    elif kind in (list, tuple, torch.Size):
        h.update(f"{kind.__name__}:{len(value)}:".encode())
        for i, item in enumerate(value):
            _feed(h, item, f"{where}[{i}]")
    elif kind in (dict, OrderedDict):
        h.update(f"dict:{len(value)}:".encode())
        for key, item in value.items():
            _feed(h, key, f"a key of {where}")
            _feed(h, item, f"{where}[{key!r}]")
        if hasattr(value, "_metadata"):  # a state_dict's module versions steer load_state_dict
            _feed(h, value._metadata, f"{where}._metadata")
    elif kind is torch.dtype:
        h.update(f"dtype:{value}".encode())
    elif (kind in (torch.Tensor, torch.nn.Parameter) and value.layout == torch.strided
          and not value.is_meta):
        t = value.detach().cpu().resolve_conj().resolve_neg().contiguous()
        h.update(f"tensor:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes of the values
    else:  # the file would be written but never load: refuse it now
        raise TypeError(f"{where} is a {kind.__module__}.{kind.__qualname__}, not plain data that "
                        "torch.load(weights_only=True) reads (str(path), x.item(), asdict(h))")


def atomic_save(obj, path):
    """torch.save(obj) to `path` so that a crash leaves the old file or the new one, never half
    of one."""
    buffer = io.BytesIO()
    # in memory first: torch's writer turns a full disk into "unexpected pos 704 vs 598"
    torch.save(obj, buffer)
    return atomic_write(path, buffer.getbuffer())


def _check_fits(path, checkpoint, model, optimizer):
    """Refuse, before anything changes, a checkpoint that model or optimizer do not fit."""
    if (saved_class := checkpoint["optimizer_class"]) != _class_name(optimizer):
        raise ValueError(f"{path} holds a {saved_class}'s state, not a {_class_name(optimizer)}'s")
    saved, own = ({k: tuple(v.shape) for k, v in state.items()}
                  for state in (checkpoint["model"], model.state_dict()))
    if differ := [k for k in sorted(saved.keys() | own.keys()) if saved.get(k) != own.get(k)]:
        raise ValueError(f"{path} is of a different architecture: keys {differ[:6]} differ")
