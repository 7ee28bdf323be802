"""Checkpoints that resume a run exactly, written atomically and checked when read back.

A checkpoint holds everything the next step depends on: weights and BatchNorm statistics,
the optimizer's state and class, the step (the LR is a function of it), requires_grad of
every parameter, and the RNG states (torch, CUDA, Python, numpy, the Generators given).
Write:  torch.save -> temporary file in the same folder -> flush -> fsync -> os.replace onto
        the path -> fsync the folder (a crash leaves the old file or the new one, never half).
Check:  sha256 over every value saved, stored in the file, recomputed on load.
Source: PyTorch's recipe "Saving and loading a general checkpoint"; the write-fsync-rename
idiom of databases and editors. docs/checkpoints.md: what a crash can cost, and what not.
"""
import hashlib
import io
import os
import random
import re
import secrets
import socket
from collections import OrderedDict, namedtuple
from pathlib import Path

import numpy as np
import torch

FORMAT = "minicnn-checkpoint-2"  # 1: no checksum, no optimizer class
Resumed = namedtuple("Resumed", "step extra")
# this host's name without dots, so that a temporary file's name parses
HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
PLAIN = "None, bool, int, float, str, bytes, list, tuple, dict, torch.Tensor"
HINTS = {"PosixPath": "str(path)", "WindowsPath": "str(path)", "set": "sorted(values)",
         "History": "dataclasses.asdict(history)", "ndarray": "torch.from_numpy(array)"}


def _feed(h, value, where):
    """Hash `value` into h, tagged by type and length; refuse what weights_only cannot load back."""
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
    else:
        hint = HINTS.get(kind.__name__,
                         "value.item() or float(value)" if kind.__module__ == "numpy" else
                         "dataclasses.asdict(value)" if hasattr(value, "__dataclass_fields__") else
                         "value._asdict()" if hasattr(value, "_asdict") else "a plain equivalent")
        raise TypeError(f"{where} is a {kind.__module__}.{kind.__qualname__}, which "
                        "torch.load(weights_only=True) cannot read back; store plain data "
                        f"({PLAIN}): use {hint}")


def checksum(contents):
    """sha256 (hex) of a dict of plain data, {name: value}; TypeError naming the first value
    that is not plain."""
    h = hashlib.sha256()
    for name, value in contents.items():
        _feed(h, name, "a name")
        _feed(h, value, name)
    return h.hexdigest()


def _file_path(path):
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give the path of a file in it, "
                                f"e.g. {path / 'ckpt.pt'}")
    if path.parent.exists() and not path.parent.is_dir():
        raise NotADirectoryError(f"{path.parent} is a file, so {path.name} cannot be written "
                                 "inside it; choose another folder")
    return path


def _dead(pid):
    """True if no process has this id (on this host); on Windows nobody can tell: False."""
    if os.name == "nt" or pid == os.getpid():  # Windows: os.kill(pid, 0) would end the process
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, under another user
        return False
    return False


def stale_temporaries(folder, names):
    """Temporary files that atomic_save left in `folder` for targets whose name matches the
    regex `names` when its process was killed (that process is gone, so nobody will finish or
    remove them)."""
    # .{name}.{host}.{pid}.{token}.tmp (no host: older versions)
    pattern = re.compile(r"\.(?:" + names + r")\.(?:(?P<host>[A-Za-z0-9-]+)\.)?(?P<pid>\d+)"
                         r"\.[0-9a-f]{8}\.tmp")
    found = []
    for entry in os.scandir(folder) if Path(folder).is_dir() else ():
        m = pattern.fullmatch(entry.name)
        if m and m.group("host") in (None, HOST) and _dead(int(m.group("pid"))):
            found.append(Path(folder) / entry.name)
    return found


def _fsync_folder(folder):
    if os.name == "nt":  # Windows cannot open a folder for fsync; its rename is durable enough
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj, path):
    """torch.save(obj) to `path` so that a crash leaves the old file or the new one, never half
    of one."""
    path = _file_path(path)
    buffer = io.BytesIO()
    # in memory first: torch's writer turns a full disk into "unexpected pos 704 vs 598"
    torch.save(obj, buffer)
    return atomic_write(path, buffer.getbuffer())


def atomic_write(path, data):
    """Write bytes (or str, as UTF-8) to `path` so that a crash or a full disk leaves the old file
    or the new one, never half of one (reports, figures: whatever was good before stays good)."""
    path = _file_path(path)
    data = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    # a killed save left them: remove
    for leftover in stale_temporaries(path.parent, re.escape(path.name)):
        leftover.unlink(missing_ok=True)
    # the temporary file must be in the same folder: os.replace is atomic only within one file
    # system (not tempfile.mkstemp: its 0600 mode would survive the rename; here the umask
    # applies, as for open())
    tmp = path.parent / f".{path.name}.{HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except PermissionError as error:  # Python's message would name the temporary file
        raise PermissionError(error.errno, f"{error.strerror}: {path} cannot be written: this "
                              f"user may not create files in its folder {path.parent} (the file "
                              "there before, if any, is unchanged); save into another folder, or "
                              "make this one writable") from error
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                f.write(data)
                f.flush()
            except OSError as error:  # a full disk, a size limit
                raise OSError(error.errno, f"{error.strerror}: {path} was not written (the file "
                              "there before, if any, is unchanged); free some space and save "
                              "again") from error
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)  # a rename: all or nothing
    except BaseException:  # a full disk, a Ctrl-C: the old file stays, the temporary goes
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)  # the rename itself survives a power cut
    return path


def save_checked(path, fmt, contents):
    """atomic_save {format, sha256, contents}; contents is checked to be plain data before
    anything is written."""
    return atomic_save({"format": fmt, "sha256": checksum(contents), "contents": contents}, path)


def load_checked(path, fmt, what):
    """The contents save_checked wrote, or a clear error: missing, a folder, unreadable, foreign,
    or damaged."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a {what} file; give the file's path")
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file at {path}; check the path (was it saved there?)")
    advice = f"Use an earlier {what}, or make this one again."
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, zero bytes, flipped bits, not torch.save's
        raise ValueError(f"{path} cannot be read as a {what}: it is damaged (truncated, empty, "
                         f"bits flipped) or not written by torch.save ({type(error).__name__}: "
                         f"{str(error)[:200]}). {advice}") from error
    if (not isinstance(saved, dict) or saved.get("format") != fmt
            or set(saved) != {"format", "sha256", "contents"}):
        raise ValueError(f"{path} is not a minicnn {what} of format {fmt}, or it is damaged; "
                         "files of older versions have no checksum and cannot be checked (for bare "
                         f"weights use model.load_state_dict(torch.load(path))). {advice}")
    try:
        same = (isinstance(saved["contents"], dict)
                and checksum(saved["contents"]) == saved["sha256"])
    except TypeError:
        same = False
    if not same:
        raise ValueError(f"{path} is damaged: its values do not match the sha256 stored with them "
                         f"(bits flipped on disk or in a copy). {advice}")
    return saved["contents"]


def _rng_states():
    # ("MT19937", keys uint32 (624,), pos, has_gauss, cached_gaussian)
    state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            # None when CUDA was never used in this process
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "python": random.getstate(),
            "numpy": (state[0], torch.from_numpy(state[1].astype(np.int64)), int(state[2]),
                      int(state[3]), float(state[4]))}


def _set_rng_states(states):
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():  # CPU-only machine: not needed
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def _check_generators(generators):
    if generators is None:
        return {}
    if not isinstance(generators, dict) or not all(isinstance(g, torch.Generator)
                                                   for g in generators.values()):
        raise TypeError("generators must be a dict {name: torch.Generator}, e.g. {'augment': g}")
    return generators


def _check_objects(model, optimizer):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not all(callable(getattr(optimizer, name, None))
               for name in ("state_dict", "load_state_dict")):
        raise TypeError("optimizer must have state_dict() and load_state_dict() (a torch.optim or "
                        f"minicnn.optim optimizer), got {type(optimizer).__name__}")


def _class_name(optimizer):
    return f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"


def save_checkpoint(path, *, model, optimizer, step, extra=None, generators=None):
    """Write a checkpoint to `path` atomically; `step` = steps done = fit's start_step on resume.

    generators: {name: torch.Generator} whose states to save (augmentation, sampling).
    extra: plain data to keep alongside (numbers, strings, lists, dicts, tensors), given back
    by load_checkpoint; anything else is refused, naming it, before a file is touched.
    """
    _check_objects(model, optimizer)
    if type(step) is not int or step < 0:  # bool is an int to Python, not a step
        raise ValueError("step must be the number of steps done (an int >= 0; int(step) for a "
                         f"numpy integer), got {step!r}")
    contents = {
        "extra": extra,  # first: the likeliest to be refused, and named in the error as extra[...]
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "optimizer_class": _class_name(optimizer),
        "step": step,
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "rng": _rng_states(),
        "generators": {name: g.get_state() for name, g in _check_generators(generators).items()},
    }
    return save_checked(path, FORMAT, contents)


def _check_architecture(path, saved, own):
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [f"{k}: saved {tuple(saved[k].shape)}, model {tuple(own[k].shape)}"
              for k in own if k in saved and saved[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def listed(names):
            return (", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")
                    or "none")
        raise ValueError(f"{path} was saved from a different architecture: missing keys: "
                         f"{listed(missing)}; unexpected keys: {listed(unexpected)}; "
                         f"shape mismatches: {listed(shapes)}. "
                         "Build the model with the same function and arguments as the saved run.")


def load_checkpoint(path, *, model, optimizer, generators=None):
    """Restore what save_checkpoint wrote -> Resumed(step, extra); then fit(..., start_step=step).

    Build model and optimizer as the saved run did (same architecture, same optimizer class,
    same param groups); nothing is changed if they differ or the file is damaged.
    generators: {name: torch.Generator}, the same names as at saving time.
    """
    _check_objects(model, optimizer)
    generators = _check_generators(generators)
    checkpoint = load_checked(path, FORMAT, "checkpoint")
    if checkpoint["optimizer_class"] != _class_name(optimizer):
        raise ValueError(f"{path} holds the state of a {checkpoint['optimizer_class']}, but the "
                         f"optimizer given is a {_class_name(optimizer)}; build the optimizer the "
                         "saved run used")
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
