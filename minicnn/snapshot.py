"""Snapshot ensembles: the weights at the end of each SGDR cycle, and the mean of their predictions.

    p(x) = (1/M) * sum_m softmax(f(x; w_m))     w_m: the weights after the last step of cycle m
Probabilities are averaged, not logits and not weights. Snapshot files are written atomically
and checked by a sha256 with minicnn/checkpoint.py, the one other module this file needs.
Source: Huang et al. 2017, "Snapshot Ensembles: Train 1, get M for free"; fast.ai 2018
lesson 2 (SGDR, cycle_save_name). docs/snapshots.md: how it differs, results, crashes.
Use:  snaps = Snapshots();  fit(..., on_cycle_end=snaps, cycle_ends=cycle_end_steps(...))
      probs = ensemble_predict(model, snaps, valid, last=3)     # or predict_each, then average
"""
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from minicnn.checkpoint import load_checked, save_checked, stale_temporaries

FORMAT = "minicnn-snapshot-2"  # 1: no checksum


def _cpu_copy(state_dict):
    """A state dict's tensors, detached and copied to the CPU (a snapshot must not change later)."""
    return {name: t.detach().to("cpu", copy=True) for name, t in state_dict.items()}


class Snapshots:
    """A list of weight copies, taken by calling it as fit's hook: snaps(model, step).

    keep: hold at most this many (the latest); None keeps all. Attributes: states (list of
    CPU state dicts), steps (the global step of each), cycles (its cycle index, 0-based).
    """

    def __init__(self, keep=None):
        if keep is not None and (type(keep) is not int or keep < 1):
            raise ValueError(f"keep must be a positive int or None (keep all), got {keep!r}")
        self.keep = keep
        self.states, self.steps, self.cycles = [], [], []
        self.calls = 0  # cycles seen, so indices stay right when old snapshots are dropped

    def __call__(self, model, step):
        """fit's on_cycle_end hook: called after the optimizer step of a cycle's last step."""
        self.states.append(_cpu_copy(model.state_dict()))  # weights and BatchNorm statistics
        self.steps.append(int(step))
        self.cycles.append(self.calls)
        self.calls += 1
        if self.keep is not None and len(self.states) > self.keep:
            del self.states[0], self.steps[0], self.cycles[0]

    def __len__(self):
        return len(self.states)

    def __getitem__(self, i):
        return self.states[i]

    def __repr__(self):
        return (f"Snapshots({len(self)} held, cycles {self.cycles}, steps {self.steps}, "
                f"keep={self.keep})")

    def save(self, folder, name="model"):
        """Write folder/{name}_cyc_{i}.pt for each snapshot (i = its cycle), each atomically ->
        list of paths."""
        folder = _folder(folder, name)
        later = sorted(cycle for cycle, _ in _files(folder, name) if cycle >= self.calls)
        if later:  # cycles this run has not reached: another run's files, which a load would mix in
            raise FileExistsError(f"{folder} holds "
                                  f"{', '.join(f'{name}_cyc_{c}.pt' for c in later)} of another "
                                  f"run (this one has taken {self.calls} cycles); remove them, or "
                                  "save this run to another folder or under another name")
        # of every cycle, held or not
        for leftover in stale_temporaries(folder, re.escape(name) + r"_cyc_\d+\.pt"):
            leftover.unlink(missing_ok=True)
        return [save_checked(folder / f"{name}_cyc_{cycle}.pt", FORMAT,
                             {"state_dict": state, "step": step, "cycle": cycle})
                for state, step, cycle in zip(self.states, self.steps, self.cycles)]

    @classmethod
    def load(cls, folder, name="model", *, keep=None):
        """The snapshots save() wrote, in cycle order (cyc_10 after cyc_9); a damaged file is
        refused by name."""
        snaps, folder = cls(keep=keep), _folder(folder, name)
        if not folder.is_dir():
            raise FileNotFoundError(f"no folder {folder}; "
                                    "give the folder that Snapshots.save wrote to")
        found = _files(folder, name)
        if not found:
            raise FileNotFoundError(f"no snapshots {name}_cyc_<i>.pt in {folder}; was save() given "
                                    "this folder and name?")
        for cycle, path in found:
            saved = load_checked(path, FORMAT, "snapshot")
            if saved["cycle"] != cycle:
                raise ValueError(f"{path} holds cycle {saved['cycle']}, not {cycle}: was it "
                                 f"renamed? Give it back its name {name}_cyc_{saved['cycle']}.pt")
            if snaps.steps and saved["step"] <= snaps.steps[-1]:
                raise ValueError(f"{path} was taken at step {saved['step']}, not after the cycle "
                                 f"before it (step {snaps.steps[-1]}): the folder mixes snapshots "
                                 "of different runs; save each run to its own folder or under "
                                 "its own name")
            snaps.states.append(saved["state_dict"])
            snaps.steps.append(saved["step"])
            snaps.cycles.append(cycle)
        snaps.calls = snaps.cycles[-1] + 1
        if keep is not None:  # the same rule as when they were taken: the latest `keep`
            del snaps.states[:-keep], snaps.steps[:-keep], snaps.cycles[:-keep]
        return snaps


def _folder(folder, name):
    if not isinstance(name, str) or not name or Path(name).name != name or name.startswith("."):
        raise ValueError("name must be a plain file-name prefix such as 'model' (no folders, "
                         f"not hidden), got {name!r}; put folders in `folder`")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder of snapshots; give a folder")
    return folder


def _files(folder, name):
    """[(cycle, path)] of the folder's {name}_cyc_<cycle>.pt files, in cycle order (cyc_10
    after cyc_9)."""
    pattern = re.compile(re.escape(name) + r"_cyc_(\d+)\.pt")
    return sorted((int(m.group(1)), folder / m.group(0))
                  for p in (folder.iterdir() if folder.is_dir() else ())
                  if (m := pattern.fullmatch(p.name)))


@torch.no_grad()
def _predict(model, batches):
    """Plain prediction: softmax probabilities (N, n_classes), float32 on the CPU, input order."""
    model.eval()
    probs = [torch.softmax(model(x).float(), dim=1).cpu() for x, *_ in batches]
    if not probs:
        raise ValueError("batches gave no batch to predict; "
                         "pass the batches of a non-empty data set")
    return torch.cat(probs)


def _states(snapshots):
    if isinstance(snapshots, Snapshots):
        states = list(snapshots.states)
    elif isinstance(snapshots, (list, tuple)) and all(isinstance(s, Mapping) for s in snapshots):
        states = list(snapshots)
    else:
        raise TypeError("snapshots must be a Snapshots or a list of state dicts (for one state "
                        f"dict: [state]), got {type(snapshots).__name__}")
    if not states:
        raise ValueError("no snapshots to ensemble; was the Snapshots passed to fit as "
                         "on_cycle_end with cycle_ends set?")
    return states


def _check_fits(model, states):
    """Every snapshot has the model's keys and shapes: refused before any weights are touched."""
    own = model.state_dict()
    for i, state in enumerate(states):
        wrong = (sorted(set(own) ^ set(state))
                 + [k for k in own if k in state and state[k].shape != own[k].shape])
        if wrong:
            raise ValueError(f"snapshot {i} does not fit the model (keys missing, extra or of "
                             f"another shape: {', '.join(wrong[:6])}); build the model the "
                             "snapshots were taken from")


def _check_probs(probs, i, first):
    """-> probs as float32 on the CPU, if they are (N, n_classes) probabilities like the first
    snapshot's."""
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2:
        raise ValueError(f"predict_fn must return probabilities (N, n_classes); for snapshot {i} "
                         f"it returned {type(probs).__name__} {tuple(getattr(probs, 'shape', ()))}")
    probs = probs.detach().float().cpu()
    if first is not None and probs.shape != first.shape:
        raise ValueError(f"snapshot {i} predicted {tuple(probs.shape)}, snapshot 0 "
                         f"{tuple(first.shape)}: batches must give the same images each time it "
                         "is read (a list, Batches, a DataLoader; not a generator)")
    if (not torch.isfinite(probs).all() or (probs < 0).any()
            or ((probs.sum(1) - 1).abs() > 1e-2).any()):
        raise ValueError(f"snapshot {i}'s predictions are not probabilities (each row >= 0, "
                         "summing to 1, no NaN): a predict_fn must return softmax probabilities, "
                         "not logits")
    return probs


def predict_each(model, snapshots, batches, *, predict_fn=None):
    """Probabilities of each snapshot -> list of (N, n_classes) float32 CPU tensors, in snapshot
    order.

    model: the architecture the snapshots came from; its own weights, buffers and every module's
        train/eval mode are put back afterwards (even if a prediction raises).
    snapshots: a Snapshots, or a list of state dicts. batches: read once per snapshot, so a list,
        Batches or DataLoader (not a one-shot generator).
    predict_fn(model, batches) -> probabilities (N, n_classes): how one snapshot predicts,
        e.g. TTA: lambda m, b: predict_tta(m, b, augment="side_on",
                                           generator=torch.Generator().manual_seed(0))
        (a new seeded generator each call, so every snapshot sees the same augmented views).
    """
    states = _states(snapshots)
    if not isinstance(model, torch.nn.Module):
        raise TypeError("model must be the nn.Module the snapshots were taken from, "
                        f"got {type(model).__name__}")
    if isinstance(batches, Iterator):  # not iter(batches): that starts an epoch of a Batches
        raise TypeError("batches is an iterator, which can be read only once; every snapshot "
                        "reads it again: pass a list, a Batches or a DataLoader")
    _check_fits(model, states)
    predict_fn = predict_fn or _predict
    own_state = _cpu_copy(model.state_dict())
    # per module: a frozen group's BN may be in eval
    modes = [(m, m.training) for m in model.modules()]
    try:
        each = []
        for i, state in enumerate(states):
            # copies into the existing tensors: same device, same Parameters
            model.load_state_dict(state)
            each.append(_check_probs(predict_fn(model, batches), i,
                                     each[0] if each else None))  # (N, n_classes)
        return each
    finally:
        model.load_state_dict(own_state)
        for module, training in modes:
            module.training = training


def ensemble_predict(model, snapshots, batches, *, last=None, predict_fn=None):
    """Mean softmax probabilities (N, n_classes) of the last `last` snapshots (None: all), on
    the CPU.

    The mean of predict_each(model, those snapshots, batches, predict_fn=predict_fn); see there.
    """
    states = _states(snapshots)
    if last is not None:
        if type(last) is not int or not 1 <= last <= len(states):
            raise ValueError(f"last={last!r}: choose between 1 and the {len(states)} "
                             "snapshots held")
        states = states[-last:]
    each = predict_each(model, states, batches, predict_fn=predict_fn)
    return sum(each) / len(each)  # p = (1/M) * sum_m p_m
