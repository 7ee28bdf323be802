"""Snapshot ensembles: keep a copy of the weights at the end of each SGDR cycle, then average
the softmax probabilities of the last few copies.

Formula. With snapshots w_1 .. w_M (the weights after the last step of cycles 1 .. M, where
the cosine has brought the LR down to lr_min) and an input x:
    p(x) = (1/M) * sum_m softmax(f(x; w_m))          average probabilities, not logits
Each cycle restarts at lr_max, which kicks the weights out of one minimum; the next cycle
settles into another. M nearby-but-different models cost one training run.

Source: Huang et al. 2017, "Snapshot Ensembles: Train 1, get M for free" (DenseNet: 3.4%
CIFAR-10 error); fast.ai 2018 lesson 2 (SGDR, `cycle_save_name`).
How it differs
- fastai 0.7 saved `{name}_cyc_{i}` files at each cycle end and left the averaging to you;
  here the copies stay in memory (on the CPU, so they never use GPU memory), can be saved
  to / loaded from the same `{name}_cyc_{i}.pt` files, and ensemble_predict does the averaging.
- Huang et al. average over the last M snapshots too; `last=M` picks them.
- No prediction code is imported: pass `predict_fn` (e.g. minicnn.tta.predict_tta, or
  minicnn.train.predict for bf16 on CUDA) to change how one snapshot predicts, so the file
  can be copied alone. The default is a plain fp32 softmax in eval mode.

Use:  snaps = Snapshots();  fit(..., on_cycle_end=snaps, cycle_ends=<last step of each cycle>)
      probs = ensemble_predict(model, snaps, valid, last=3)
"""
import re
from pathlib import Path

import torch


def _cpu_copy(state_dict):
    """A state dict's tensors, detached and copied to the CPU (a snapshot must not change later)."""
    return {name: t.detach().to("cpu", copy=True) for name, t in state_dict.items()}


class Snapshots:
    """A list of weight copies, taken by calling it as fit's hook: snaps(model, step).

    keep: hold at most this many (the latest); None keeps all. Attributes: states (list of
    CPU state dicts), steps (the global step of each), cycles (its cycle index, 0-based).
    """

    def __init__(self, keep=None):
        if keep is not None and (not isinstance(keep, int) or keep < 1):
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
        return f"Snapshots({len(self)} held, cycles {self.cycles}, steps {self.steps}, keep={self.keep})"

    def save(self, folder, name="model"):
        """Write folder/{name}_cyc_{i}.pt for each snapshot (i = its cycle) -> list of paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for state, step, cycle in zip(self.states, self.steps, self.cycles):
            paths.append(folder / f"{name}_cyc_{cycle}.pt")
            torch.save({"state_dict": state, "step": step, "cycle": cycle}, paths[-1])
        return paths

    @classmethod
    def load(cls, folder, name="model", *, keep=None):
        """The snapshots save() wrote, in cycle order (cyc_10 after cyc_9)."""
        pattern = re.compile(re.escape(name) + r"_cyc_(\d+)\.pt")
        found = [(int(m.group(1)), p) for p in Path(folder).glob(f"{name}_cyc_*.pt")
                 if (m := pattern.fullmatch(p.name))]
        if not found:
            raise FileNotFoundError(f"no snapshots {name}_cyc_<i>.pt in {folder}; was save() given "
                                    "this folder and name?")
        snaps = cls(keep=keep)
        for cycle, path in sorted(found):
            saved = torch.load(path, map_location="cpu", weights_only=True)
            snaps.states.append(saved["state_dict"])
            snaps.steps.append(saved["step"])
            snaps.cycles.append(cycle)
        snaps.calls = snaps.cycles[-1] + 1
        if keep is not None:  # the same rule as when they were taken: the latest `keep`
            del snaps.states[:-keep], snaps.steps[:-keep], snaps.cycles[:-keep]
        return snaps


@torch.no_grad()
def _predict(model, batches):
    """Plain prediction: softmax probabilities (N, n_classes), float32 on the CPU, input order."""
    model.eval()
    return torch.cat([torch.softmax(model(x).float(), dim=1).cpu() for x, *_ in batches])


def ensemble_predict(model, snapshots, batches, *, last=None, predict_fn=None):
    """Mean softmax probabilities (N, n_classes) of the chosen snapshots, on the CPU, input order.

    model: the architecture the snapshots came from; its own weights, buffers and train/eval
        mode are put back afterwards (even if a prediction raises).
    snapshots: a Snapshots, or a list of state dicts. last: use only the last M (None: all).
    predict_fn(model, batches) -> probabilities (N, n_classes): how one snapshot predicts,
        e.g. TTA: lambda m, b: predict_tta(m, b, augment="side_on", generator=torch.Generator().manual_seed(0))
        (a new seeded generator each call, so every snapshot sees the same augmented views).
    """
    states = list(snapshots.states if isinstance(snapshots, Snapshots) else snapshots)
    if not states:
        raise ValueError("no snapshots to ensemble; was the Snapshots passed to fit as on_cycle_end "
                         "with cycle_ends set?")
    if last is not None:
        if not isinstance(last, int) or not 1 <= last <= len(states):
            raise ValueError(f"last={last!r}: choose between 1 and the {len(states)} snapshots held")
        states = states[-last:]
    predict_fn = predict_fn or _predict
    own_state = _cpu_copy(model.state_dict())
    modes = [(m, m.training) for m in model.modules()]  # per module: a frozen group's BN may be in eval
    try:
        total = None
        for state in states:
            model.load_state_dict(state)  # copies into the existing tensors: same device, same Parameters
            probs = predict_fn(model, batches).float().cpu()  # (N, n_classes)
            total = probs if total is None else total + probs
        return total / len(states)
    finally:
        model.load_state_dict(own_state)
        for module, training in modes:
            module.training = training
