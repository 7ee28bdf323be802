"""Under- or over-fitting, in words: a verdict on a training history, with the numbers behind it.

fast.ai 2018 lesson 2: "validation loss well below training loss means underfitting: train
longer"; and a model only overfits once its validation loss gets worse, not merely when
training loss is the lower of the two. Rules, on the last epoch E (epochs counted from 1),
T = training loss, V = validation loss, V_best = lowest V, at epoch b; first match wins:
  1. underfitting (not learning): T > (1 - min_fall) * T_start, min_fall = 0.10, where
     T_start = history.batch_loss[0], the loss before any step (only when recorded)
                                                           -> check the LR (lr_find) and data
  2. underfitting: V < (1 - margin) * T, margin = 0.10     -> train longer
  3. underfitting (unstable): b < E, V > (1 + rise) * V_best, rise = 0.03, and T >= T_b (T at
     epoch b): both losses rose, the steps are too large    -> lower or anneal the LR
  4. overfitting: b < E, V > (1 + rise) * V_best, T < T_b  -> stop at epoch b
  5. still improving: b == E and V fell by more than improving = 0.01 (1%) in the last
     epoch, or there is one epoch only                     -> train longer
  6. good fit: V has levelled off at (or within rise of) its best -> keep it
Which T: history.train_eval_loss when recorded (train.fit(..., train_eval=Batches of a
training sample)): the loss in eval mode, without augmentation, at the epoch's end. The
running train_loss is the mean over an epoch in train mode: dropout drops units,
augmentation makes images harder, BatchNorm uses batch statistics, and the weights
early in the epoch were worse; all push it up, so it can sit above V although the model
fits the training set better than the validation set. Used only when nothing else is
recorded, and the Diagnosis says so.
Differs from fastai (which prints the losses and leaves the reading to you): the rules
are written down here, with their thresholds as keyword arguments.
"""
from dataclasses import dataclass

VERDICTS = ("underfitting", "overfitting", "still improving", "good fit")


@dataclass
class Diagnosis:
    verdict: str           # one of VERDICTS
    advice: str            # one sentence, with the numbers
    train_loss: float      # T at the last epoch
    valid_loss: float      # V at the last epoch
    best_valid_loss: float
    best_epoch: int        # counted from 1
    epochs: int
    train_source: str      # "train_eval_loss" or "train_loss"

    def __str__(self):
        return f"{self.verdict}: {self.advice}"


def _check_losses(values, name):
    values = [float(v) for v in values]
    if any(v != v or v in (float("inf"), float("-inf")) for v in values):
        raise ValueError(f"history.{name} holds a non-finite loss: {values}; the run diverged, "
                         "lower the learning rate")
    return values


def diagnose(history, *, margin=0.10, rise=0.03, improving=0.01, min_fall=0.10):
    """Verdict on a History (or anything with per-epoch train_loss/valid_loss lists) -> Diagnosis."""
    valid = _check_losses(getattr(history, "valid_loss", []) or [], "valid_loss")
    if not valid:
        raise ValueError("diagnose needs per-epoch validation losses: fit(..., valid=Batches) records them")
    train_eval = getattr(history, "train_eval_loss", []) or []
    if len(train_eval) == len(valid):
        train, source = _check_losses(train_eval, "train_eval_loss"), "train_eval_loss"
        note = "training loss in eval mode on a training sample"
    else:
        train, source = _check_losses(history.train_loss, "train_loss"), "train_loss"
        note = ("running training loss in train mode (no train_eval_loss recorded; it reads high: "
                "pass train_eval= to fit for a fair one)")
    if len(train) != len(valid):
        raise ValueError(f"history.{source} has {len(train)} epochs but valid_loss has {len(valid)}")
    epochs, t, v = len(valid), train[-1], valid[-1]
    best = min(range(epochs), key=lambda e: valid[e])  # first epoch of the lowest V
    v_best = valid[best]
    numbers = f"T {t:.4f} ({note}), V {v:.4f} at epoch {epochs}; best V {v_best:.4f} at epoch {best + 1}"
    batch_loss = getattr(history, "batch_loss", []) or []

    if batch_loss and t > (1 - min_fall) * float(batch_loss[0]):
        verdict = "underfitting"
        advice = (f"the training loss {t:.4f} is not {min_fall:.0%} below the first minibatch's "
                  f"{float(batch_loss[0]):.4f}: the model is not learning; check the learning rate (run "
                  "lr_find) and the data")
    elif v < (1 - margin) * t:
        verdict = "underfitting"
        advice = (f"the validation loss is {1 - v / t:.0%} below the training loss: train longer "
                  "(more epochs or cycles), or use less regularization or a bigger model")
    elif best < epochs - 1 and v > (1 + rise) * v_best and t >= train[best]:
        verdict = "underfitting"
        advice = (f"the validation loss rose {v / v_best - 1:.0%} from its best at epoch {best + 1} and the "
                  f"training loss rose too ({train[best]:.4f} -> {t:.4f}): the steps are too large to settle; "
                  "lower the learning rate or anneal it (SGDR)")
    elif best < epochs - 1 and v > (1 + rise) * v_best:
        verdict = "overfitting"
        advice = (f"the validation loss rose {v / v_best - 1:.0%} from its best at epoch {best + 1}: stop "
                  f"at epoch {best + 1} (or keep its snapshot); for more, add augmentation, data or weight decay")
    elif epochs == 1 or (best == epochs - 1 and valid[-2] - v > improving * valid[-2]):
        verdict = "still improving"
        fell = "one epoch only, no trend yet" if epochs == 1 else \
            f"the validation loss fell {1 - v / valid[-2]:.1%} in the last epoch"
        advice = f"{fell}: train longer (more epochs, or another SGDR cycle)"
    else:
        verdict = "good fit"
        advice = (f"the validation loss has levelled off near its best (epoch {best + 1}): keep this model; "
                  "more augmentation or data could lower it further")
    return Diagnosis(verdict, f"{advice} [{numbers}]", t, v, v_best, best + 1, epochs, source)
