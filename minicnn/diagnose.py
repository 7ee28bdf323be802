"""Under- or over-fitting, in words: a verdict on a training history, with the numbers behind it.

On the last epoch E: T = training loss, V = validation loss, V_best = lowest V, at epoch b;
the first rule that matches wins (thresholds are keyword arguments):
  1. T > (1 - min_fall) * first minibatch loss        underfitting, not learning: check LR, data
  2. V < (1 - margin) * T                             underfitting: train longer
  3. b < E, V > (1 + rise) * V_best, T >= T_b         underfitting, unstable: lower or anneal LR
  4. b < E, V > (1 + rise) * V_best, T < T_b          overfitting: stop at epoch b
  5. V fell > improving in the last epoch, or E == 1  still improving: train longer
  6. otherwise                                        good fit
T is history.train_eval_loss (eval mode, a training sample) when recorded, else train_loss.
Source: fast.ai 2018 lesson 2 ("validation loss well below training loss: underfitting").
docs/diagnose.md: why the eval-mode training loss, and where rule 3 came from.
"""
import math
from collections.abc import Mapping
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


def diagnose(history, *, margin=0.10, rise=0.03, improving=0.01, min_fall=0.10):
    """Verdict on a History, or a mapping such as dataclasses.asdict(history) -> Diagnosis."""
    if isinstance(history, Mapping):
        get = history.get
    else:  # a train.History
        get = lambda name, default: getattr(history, name, default)  # noqa: E731
    if not all(0 <= f < 1 for f in (margin, rise, improving, min_fall)):  # fractions
        raise ValueError(f"diagnose: need 0 <= {margin=}, {rise=}, {improving=}, {min_fall=} < 1")
    valid = _losses(get("valid_loss", []) or [], "valid_loss")
    if not valid:
        raise ValueError("diagnose needs validation losses: fit(..., valid=Batches) records them")
    train_eval = get("train_eval_loss", []) or []
    if len(train_eval) == len(valid):
        train, source = _losses(train_eval, "train_eval_loss"), "train_eval_loss"
        note = "training loss in eval mode on a training sample"
    else:
        train, source = _losses(get("train_loss", []) or [], "train_loss"), "train_loss"
        note = ("running training loss in train mode (no train_eval_loss recorded; it reads high: "
                "pass train_eval= to fit for a fair one)")
    if len(train) != len(valid):
        raise ValueError(f"history.{source} has {len(train)} epochs, valid_loss {len(valid)}")
    epochs, t, v = len(valid), train[-1], valid[-1]
    best = min(range(epochs), key=lambda e: valid[e])  # first epoch of the lowest V
    v_best = valid[best]
    evidence = (f"T {t:.4f} ({note}), V {v:.4f} at epoch {epochs}; "
                f"best V {v_best:.4f} at epoch {best + 1}")
    # the loss before any step
    batch_loss = _losses((get("batch_loss", []) or [])[:1], "batch_loss")

    if batch_loss and t > (1 - min_fall) * float(batch_loss[0]):
        verdict = "underfitting"
        advice = (f"the training loss {t:.4f} is not {min_fall:.0%} below the first minibatch's "
                  f"{float(batch_loss[0]):.4f}: the model is not learning; check the learning "
                  "rate (run lr_find) and the data")
    elif v < (1 - margin) * t:
        verdict = "underfitting"
        advice = (f"the validation loss is {1 - v / t:.0%} below the training loss: train longer "
                  "(more epochs or cycles), or use less regularization or a bigger model")
    elif best < epochs - 1 and v > (1 + rise) * v_best and t >= train[best]:
        verdict = "underfitting"
        advice = (f"the validation loss rose {v / v_best - 1:.0%} from its best at epoch "
                  f"{best + 1} and the training loss rose too ({train[best]:.4f} -> {t:.4f}): the "
                  "steps are too large to settle; lower the learning rate or anneal it (SGDR)")
    elif best < epochs - 1 and v > (1 + rise) * v_best:
        verdict = "overfitting"
        advice = (f"the validation loss rose {v / v_best - 1:.0%} from its best at epoch "
                  f"{best + 1}: stop at epoch {best + 1} (or keep its snapshot); for more, add "
                  "augmentation, data or weight decay")
    elif epochs == 1 or (best == epochs - 1 and valid[-2] - v > improving * valid[-2]):
        verdict = "still improving"
        fell = "one epoch only, no trend yet" if epochs == 1 else \
            f"the validation loss fell {1 - v / valid[-2]:.1%} in the last epoch"
        advice = f"{fell}: train longer (more epochs, or another SGDR cycle)"
    else:
        verdict = "good fit"
        advice = (f"the validation loss has levelled off near its best (epoch {best + 1}): "
                  "keep this model; more augmentation or data could lower it further")
    return Diagnosis(verdict, f"{advice} [{evidence}]", t, v, v_best, best + 1, epochs, source)


def _losses(values, name):
    """The losses as floats; the NaN diagnosis: a non-finite one means the run diverged."""
    values = [float(v) for v in values]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"history.{name}={values} is not finite: the run diverged; lower the LR")
    return values
