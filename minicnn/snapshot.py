"""Snapshot ensembles: the weights at the end of each SGDR cycle, and the mean of their predictions.

    p(x) = (1/M) * sum_m softmax(f(x; w_m))     w_m: the weights after the last step of cycle m
Probabilities are averaged, not logits and not weights. Snapshot files are written atomically
and checked by a sha256 with minicnn/checkpoint.py and minicnn/atomic.py, the modules it needs.
Source: Huang et al. 2017, "Snapshot Ensembles: Train 1, get M for free"; fast.ai 2018
lesson 2 (SGDR, cycle_save_name). docs/snapshots.md: how it differs, results, crashes.
Use:  snaps = Snapshots();  fit(..., on_cycle_end=snaps, cycle_ends=cycle_end_steps(...))
      probs = ensemble_predict(model, snaps, valid, last=3)     # or predict_each, then average
"""
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from minicnn.atomic import stale_temporaries
from minicnn.checkpoint import load_checked, save_checked

FORMAT = "minicnn-snapshot-2"  # 1: no checksum


def ensemble_predict(model, snapshots, batches, *, last=None, predict_fn=None):
    """Mean softmax probabilities (N, n_classes) of the last `last` snapshots (None: all), on
    the CPU.

    The mean of predict_each(model, those snapshots, batches, predict_fn=predict_fn); see there.
    """
    states = _states(snapshots)
    if last is not None and not 1 <= last <= len(states):  # states[-0:] would be all of them
        raise ValueError(f"last={last!r}: choose between 1 and the {len(states)} snapshots held")
    each = predict_each(model, states[-last:] if last else states, batches, predict_fn=predict_fn)
    return sum(each) / len(each)  # p = (1/M) * sum_m p_m


def predict_each(model, snapshots, batches, *, predict_fn=None):
    """Probabilities of each snapshot -> list of (N, n_classes) float32 CPU tensors, in snapshot
    order.

    model: the architecture the snapshots came from; its own weights, buffers and every module's
        train/eval mode are put back afterwards (even if a prediction raises).
    snapshots: a Snapshots, a list of state dicts, or one state dict. batches: read once per
        snapshot, so a list, Batches or DataLoader (not a one-shot generator).
    predict_fn(model, batches) -> probabilities (N, n_classes): how one snapshot predicts,
        e.g. TTA: lambda m, b: predict_tta(m, b, augment="side_on",
                                           generator=torch.Generator().manual_seed(0))
        (a new seeded generator each call, so every snapshot sees the same augmented views).
    """
    states, predict_fn = _states(snapshots), predict_fn or _predict
    if not states:
        raise ValueError("no snapshots: pass Snapshots() to fit as on_cycle_end, with cycle_ends")
    own_state = _cpu_copy(model.state_dict())
    # per module: a frozen group's BN may be in eval
    modes = [(m, m.training) for m in model.modules()]
    try:
        each = []
        for i, state in enumerate(states):
            try:  # copies into the existing tensors: same device, same Parameters
                model.load_state_dict(state)
            except RuntimeError as error:  # torch lists the keys that differ
                raise ValueError(f"snapshot {i} is not of this model's architecture") from error
            probs = predict_fn(model, batches).detach().float().cpu()  # (N, n_classes)
            each.append(probs)
            if not ((probs.sum(-1) - 1).abs() < 1e-2).all() or probs.shape != each[0].shape:
                raise ValueError(f"snapshot {i}: predict_fn gave {tuple(probs.shape)}, not "
                                 "probabilities (N, n_classes) like snapshot 0's (logits?)")
        return each
    finally:
        model.load_state_dict(own_state)
        for module, training in modes:
            module.training = training


class Snapshots:
    """A list of weight copies, taken by calling it as fit's hook: snaps(model, step).

    keep: hold at most this many (the latest); None keeps all. Attributes: states (list of
    CPU state dicts), steps (the global step of each), cycles (its cycle index, 0-based).
    """

    def __init__(self, keep=None):
        if keep is not None and keep < 1:  # it would hold none: the run's snapshots lost
            raise ValueError(f"keep must be >= 1 or None (keep all), got {keep}")
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
        folder = Path(folder)
        later = [path.name for cycle, path in _files(folder, name) if cycle >= self.calls]
        if later:  # cycles this run has not reached: another run's files, which a load would mix in
            raise FileExistsError(f"{folder} holds {later} of another run ({self.calls} cycles "
                                  "here); save each run to its own folder or under its own name")
        # of every cycle, held or not
        for leftover in stale_temporaries(folder, re.escape(name) + r"_cyc_\d+\.pt"):
            leftover.unlink(missing_ok=True)
        return [save_checked(folder / f"{name}_cyc_{cycle}.pt", FORMAT,
                             {"state_dict": state, "step": step, "cycle": cycle})
                for state, step, cycle in zip(self.states, self.steps, self.cycles)]

    @classmethod
    def load(cls, folder, name="model", *, keep=None):
        """The snapshots save() wrote, in cycle order (cyc_10 after cyc_9); a damaged or foreign
        file is refused by name, and so are a renamed one and a folder that mixes two runs."""
        snaps, folder = cls(keep=keep), Path(folder)
        found = _files(folder, name)
        if not found:
            raise FileNotFoundError(f"no snapshots {name}_cyc_<i>.pt in {folder}")
        for cycle, path in found:
            saved = load_checked(path, FORMAT, "snapshot")
            if saved["cycle"] != cycle or snaps.steps and saved["step"] <= snaps.steps[-1]:
                raise ValueError(f"{path} holds cycle {saved['cycle']}, step {saved['step']} "
                                 f"(steps before: {snaps.steps}): renamed, or two runs mixed?")
            snaps.states.append(saved["state_dict"])
            snaps.steps.append(saved["step"])
            snaps.cycles.append(cycle)
        snaps.calls = snaps.cycles[-1] + 1
        if keep is not None:  # the same rule as when they were taken: the latest `keep`
            del snaps.states[:-keep], snaps.steps[:-keep], snaps.cycles[:-keep]
        return snaps


def _cpu_copy(state_dict):
    """A state dict's tensors, detached and copied to the CPU (a snapshot must not change later)."""
    return {name: t.detach().to("cpu", copy=True) for name, t in state_dict.items()}


def _files(folder, name):
    """[(cycle, path)] of the folder's {name}_cyc_<cycle>.pt files, in cycle order (cyc_10
    after cyc_9)."""
    pattern = re.compile(re.escape(name) + r"_cyc_(\d+)\.pt")
    return sorted((int(m.group(1)), folder / m.group(0))
                  for p in (folder.iterdir() if folder.is_dir() else ())
                  if (m := pattern.fullmatch(p.name)))


def _states(snapshots):
    """A Snapshots, a list of state dicts or one state dict -> a list of state dicts."""
    if isinstance(snapshots, Mapping):
        return [snapshots]
    return list(snapshots.states if isinstance(snapshots, Snapshots) else snapshots)


@torch.no_grad()
def _predict(model, batches):
    """Plain prediction: softmax probabilities (N, n_classes), float32 on the CPU, input order."""
    model.eval()
    probs = [torch.softmax(model(x).float(), dim=1).cpu() for x, *_ in batches]
    if not probs:  # empty, or a one-shot iterator that the snapshot before has read
        raise ValueError("batches gave no batch; pass a list, Batches or DataLoader")
    return torch.cat(probs)
