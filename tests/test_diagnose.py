"""diagnose: each verdict on a hand-made history, which training loss it used, thresholds, errors."""
import dataclasses
import math

import pytest
import torch
from torch import nn

from minicnn.data import Batches
from minicnn.diagnose import VERDICTS, Diagnosis, diagnose
from minicnn.train import History, fit


def test_seed_case_validation_far_below_training_is_underfitting():
    # The seed's rule: validation loss well below (running) training loss -> train longer.
    h = History(train_loss=[0.9, 0.7, 0.6], valid_loss=[0.6, 0.5, 0.45], valid_acc=[0.8, 0.83, 0.85])
    d = diagnose(h)
    assert isinstance(d, Diagnosis) and d.verdict == "underfitting"
    assert "train longer" in d.advice and "25% below" in d.advice
    assert d.train_source == "train_loss" and "no train_eval_loss recorded" in d.advice
    assert (d.train_loss, d.valid_loss, d.best_valid_loss, d.best_epoch, d.epochs) == (0.6, 0.45, 0.45, 3, 3)
    assert str(d).startswith("underfitting: ")


def test_eval_mode_training_loss_preferred_and_changes_the_verdict():
    # Same run, but measured fairly the training loss is below V: no longer underfitting.
    h = History(train_loss=[0.9, 0.7, 0.6], valid_loss=[0.6, 0.5, 0.45], valid_acc=[0.8, 0.83, 0.85],
                train_eval_loss=[0.55, 0.44, 0.40])
    d = diagnose(h)
    assert d.train_source == "train_eval_loss" and d.train_loss == 0.40
    assert d.verdict == "still improving" and "fell 10.0% in the last epoch" in d.advice


def test_overfitting_names_the_epoch_to_stop_at():
    h = History(train_loss=[0.6, 0.4, 0.3, 0.2, 0.15], valid_loss=[0.6, 0.45, 0.40, 0.43, 0.48],
                valid_acc=[0.8] * 5, train_eval_loss=[0.5, 0.35, 0.25, 0.15, 0.1])
    d = diagnose(h)
    assert d.verdict == "overfitting" and d.best_epoch == 3 and d.best_valid_loss == 0.40
    assert "stop at epoch 3" in d.advice and "rose 20%" in d.advice


def test_both_losses_rising_is_instability_not_overfitting():
    # Constant high LR: validation AND eval-mode training loss went up after epoch 2.
    h = History(train_loss=[1.0, 0.6, 0.5], valid_loss=[1.2, 0.57, 0.85], valid_acc=[0.6, 0.8, 0.72],
                train_eval_loss=[1.1, 0.55, 0.76])
    d = diagnose(h)
    assert d.verdict == "underfitting" and d.best_epoch == 2
    assert "training loss rose too (0.5500 -> 0.7600)" in d.advice and "lower the learning rate" in d.advice


def test_good_fit_when_validation_levels_off_at_its_best():
    h = History(train_loss=[0.6, 0.45, 0.42, 0.41], valid_loss=[0.6, 0.45, 0.400, 0.401],
                valid_acc=[0.8] * 4, train_eval_loss=[0.55, 0.42, 0.38, 0.37])
    d = diagnose(h)
    assert d.verdict == "good fit" and d.best_epoch == 3


def test_small_last_gain_is_good_fit_and_larger_one_still_improving():
    base = dict(train_loss=[0.6, 0.45, 0.42], valid_acc=[0.8] * 3, train_eval_loss=[0.55, 0.42, 0.38])
    assert diagnose(History(valid_loss=[0.6, 0.45, 0.448], **base)).verdict == "good fit"  # 0.4%
    assert diagnose(History(valid_loss=[0.6, 0.45, 0.440], **base)).verdict == "still improving"  # 2.2%
    assert diagnose(History(valid_loss=[0.6, 0.45, 0.448], **base), improving=0.001).verdict == "still improving"


def test_one_epoch_is_still_improving():
    d = diagnose(History(train_loss=[0.5], valid_loss=[0.48], valid_acc=[0.8]))
    assert d.verdict == "still improving" and "one epoch only" in d.advice


def test_loss_that_never_fell_from_its_start_is_not_learning():
    h = History(batch_loss=[2.31, 2.30, 2.32, 2.29], train_loss=[2.31, 2.30], valid_loss=[2.30, 2.31],
                valid_acc=[0.1, 0.1])
    d = diagnose(h)
    assert d.verdict == "underfitting" and "not learning" in d.advice and "lr_find" in d.advice
    # without batch_loss the start is unknown, and a flat run reads as levelled off
    assert diagnose(History(train_loss=[2.31, 2.30], valid_loss=[2.30, 2.31], valid_acc=[0.1, 0.1])).verdict \
        == "good fit"


def test_thresholds_are_the_keyword_arguments():
    h = History(train_loss=[0.9, 0.7, 0.6], valid_loss=[0.6, 0.5, 0.45], valid_acc=[0.8] * 3)
    assert diagnose(h, margin=0.3).verdict == "still improving"  # 25% below is not 30% below
    h = History(train_loss=[0.5, 0.4, 0.3], valid_loss=[0.5, 0.40, 0.41], valid_acc=[0.8] * 3,
                train_eval_loss=[0.45, 0.35, 0.25])
    assert diagnose(h).verdict == "good fit"  # rose 2.5%, under rise=3%
    assert diagnose(h, rise=0.02).verdict == "overfitting"


def test_train_eval_of_the_wrong_length_falls_back_to_train_loss():
    h = History(train_loss=[0.5, 0.4], valid_loss=[0.5, 0.45], valid_acc=[0.8] * 2, train_eval_loss=[0.4])
    assert diagnose(h).train_source == "train_loss"


def test_bad_histories():
    with pytest.raises(ValueError, match="valid="):
        diagnose(History(train_loss=[0.5]))
    with pytest.raises(ValueError, match=r"train_loss=\[0.5, nan\] is not finite"):
        diagnose(History(train_loss=[0.5, math.nan], valid_loss=[0.5, 0.4]))
    with pytest.raises(ValueError, match=r"valid_loss=\[0.5, inf\] is not finite"):
        diagnose(History(train_loss=[0.5, 0.4], valid_loss=[0.5, math.inf]))
    with pytest.raises(ValueError, match="train_loss has 2 epochs, valid_loss 3"):
        diagnose(History(train_loss=[0.5, 0.4], valid_loss=[0.5, 0.4, 0.3]))
    with pytest.raises(ValueError, match="valid="):  # not a History: no valid_loss in it
        diagnose([0.5, 0.4])


def test_a_dict_of_the_lists_gives_the_same_diagnosis():
    h = History(train_loss=[0.6, 0.4, 0.3, 0.2, 0.15], valid_loss=[0.6, 0.45, 0.40, 0.43, 0.48],
                valid_acc=[0.8] * 5, train_eval_loss=[0.5, 0.35, 0.25, 0.15, 0.1], batch_loss=[0.7, 0.6])
    assert diagnose(dataclasses.asdict(h)) == diagnose(h) and diagnose(h).verdict == "overfitting"
    only = {"train_loss": [0.9, 0.7, 0.6], "valid_loss": [0.6, 0.5, 0.45]}  # a dict with some lists only
    assert diagnose(only) == diagnose(History(**only))


@pytest.mark.parametrize("name, value", [("margin", -0.1), ("rise", 1.5), ("min_fall", math.nan),
                                         ("margin", True)])
def test_thresholds_must_be_fractions(name, value):
    h = History(train_loss=[0.5], valid_loss=[0.48])
    with pytest.raises(ValueError, match=f"{name}={value}"):
        diagnose(h, **{name: value})


def test_on_a_real_fit_with_train_eval():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 6, 6, generator=g), torch.randint(0, 2, (64,), generator=g)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2))
    train = Batches(x[:48], y[:48], 16, shuffle=True, generator=g)
    h = fit(model, train, Batches(x[48:], y[48:], 16, shuffle=False), torch.optim.SGD(model.parameters(), lr=0.1),
            lambda step: 0.1, 3, train_eval=Batches(x[:16], y[:16], 16, shuffle=False), verbose=False)
    d = diagnose(h)
    assert d.verdict in VERDICTS and d.train_source == "train_eval_loss"
    assert d.train_loss == h.train_eval_loss[-1] and d.valid_loss == h.valid_loss[-1]
