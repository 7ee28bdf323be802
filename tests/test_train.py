"""fit, evaluate, predict on tiny problems: the loss falls, the schedule is obeyed, order kept,
any loader works, and every bad input or fault gets an error that says what to do."""
import functools
import math
import sys

import numpy as np
import pytest
from conftest import blobs
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from minicnn.data import Batches
from minicnn.models import simple_resnet
from minicnn.train import History, accuracy, evaluate, fit, join_histories, predict


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return simple_resnet(2, widths=(4, 4))


def test_fit_lowers_the_loss_and_records_the_lr_of_every_step():
    x, y = blobs(96)
    train = Batches(x, y, 16, shuffle=True, generator=torch.Generator().manual_seed(0))
    valid = Batches(*blobs(32, seed=1), 32, shuffle=False)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    before = evaluate(model, valid)[0]
    history = fit(model, train, valid, opt, lambda step: 0.05 + 0.001 * step, 4, verbose=False)
    assert len(history.batch_loss) == 4 * len(train) == 24
    assert history.batch_lr == [[pytest.approx(0.05 + 0.001 * s)] for s in range(24)]
    assert history.valid_loss[-1] < 0.5 * before and history.valid_acc[-1] >= 0.9
    assert len(history.train_loss) == len(history.seconds) == 4


def test_one_lr_per_param_group_and_the_count_is_checked():
    x, y = blobs(32)
    train = Batches(x, y, 16, shuffle=False)
    model = tiny_model()
    groups = [{"params": g.parameters()} for g in model.layer_groups]
    opt = torch.optim.SGD(groups, lr=0.1)
    history = fit(model, train, None, opt, lambda step: [0.001, 0.01, 0.1], 1, verbose=False)
    assert history.batch_lr[0] == [0.001, 0.01, 0.1]
    assert [g["lr"] for g in opt.param_groups] == [0.001, 0.01, 0.1]
    history = fit(model, train, None, opt, lambda step: np.float32(0.5), 1, verbose=False)
    assert history.batch_lr[0] == [0.5, 0.5, 0.5]  # one number of any real type: every group
    with pytest.raises(ValueError, match=r"lr_at\(0\).*3 param groups"):
        fit(model, train, None, opt, lambda step: [0.1, 0.1], 1, verbose=False)


def test_nan_loss_stops_with_step_and_lr():
    x, y = blobs(32)
    train = Batches(x, y, 8, shuffle=False)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss_fn(logits, target, _calls=[0]):
        _calls[0] += 1
        loss = nn.functional.cross_entropy(logits, target)
        return loss * float("nan") if _calls[0] == 3 else loss

    with pytest.raises(FloatingPointError, match=r"nan at step 2 .*lr \[0.1\].*lower the learning rate"):
        fit(model, train, None, opt, lambda step: 0.1, 1, loss_fn=loss_fn, verbose=False)


def test_augment_runs_on_training_batches_only_and_cycle_hook_sees_the_steps():
    x, y = blobs(32)
    train = Batches(x, y, 8, shuffle=False)
    valid = Batches(x, y, 8, shuffle=False)
    seen, ends = [], []
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fit(model, train, valid, opt, lambda s: 0.1, 2, verbose=False,
        augment=lambda xb: seen.append(len(xb)) or xb.flip(3),
        cycle_ends=[3, 7], on_cycle_end=lambda m, step: ends.append((m is model, step)))
    assert seen == [8] * 8  # 2 epochs x 4 batches, none from evaluation
    assert ends == [(True, 3), (True, 7)]


class Stop(Exception):
    pass


def test_start_step_resumes_where_the_run_stopped():
    x, y = blobs(40)
    make = lambda: Batches(x, y, 8, shuffle=True, generator=torch.Generator().manual_seed(5))  # noqa: E731
    schedule = lambda s: 0.1 / (1 + s)  # noqa: E731
    model_a = tiny_model()
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.1, momentum=0.9)
    whole = fit(model_a, make(), None, opt_a, schedule, 2, verbose=False)

    def stop_at_7(step):
        if step == 7:
            raise Stop  # the run is interrupted before its 8th step (mid-epoch 1)
        return schedule(step)

    model_b = tiny_model()
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(Stop):
        fit(model_b, make(), None, opt_b, stop_at_7, 2, verbose=False)
    rest = fit(model_b, make(), None, opt_b, schedule, 2, start_step=7, verbose=False)
    assert rest.batch_lr == whole.batch_lr[7:]
    assert rest.batch_loss == whole.batch_loss[7:]  # same batches in the same order
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()):
        assert torch.equal(a, b)


def test_evaluate_and_predict_keep_order_and_mode():
    x, y = blobs(20)
    model = tiny_model().train()
    probs = predict(model, Batches(x, y, 6, shuffle=False))
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        expected = torch.softmax(model(x), 1)
    assert torch.allclose(probs, expected, atol=1e-6)
    assert torch.allclose(probs.sum(1), torch.ones(20))
    loss, accuracy = evaluate(model, Batches(x, y, 7, shuffle=False))
    with torch.no_grad():
        assert math.isclose(loss, float(nn.functional.cross_entropy(model(x), y)), rel_tol=1e-5)
    assert accuracy == int((expected.argmax(1) == y).sum()) / 20


def test_evaluate_gives_each_module_its_own_mode_back():
    x, y = blobs(8)
    model = tiny_model().train()
    frozen_bn = model.layer_groups[0][1][1]  # a BatchNorm kept in eval mode, as freeze(train_bn=False) does
    frozen_bn.eval()
    evaluate(model, Batches(x, y, 4, shuffle=False))
    predict(model, Batches(x, y, 4, shuffle=False))
    assert model.training and not frozen_bn.training



def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- what train may be --------------------------------------------------------------------------

def test_a_dataloader_a_list_and_batches_train_to_the_same_weights():
    x, y = blobs(40)
    loaders = {
        "DataLoader": DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False),
        "list": [(x[i:i + 8], y[i:i + 8]) for i in range(0, 40, 8)],
        "Batches": Batches(x, y, 8, shuffle=False),
    }
    results = {}
    for name, train in loaders.items():
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        history = fit(model, train, train, opt, lambda s: 0.1 / (1 + s), 2, verbose=False)
        results[name] = (weights(model), history.batch_loss, history.valid_loss)
    assert results["DataLoader"][1] == results["list"][1] == results["Batches"][1]
    assert results["DataLoader"][2] == results["list"][2] == results["Batches"][2]
    assert same_weights(results["DataLoader"][0], results["list"][0])
    assert same_weights(results["DataLoader"][0], results["Batches"][0])
    assert not same_weights(results["list"][0], weights(tiny_model()))  # it did train


def test_a_dataloader_resumed_mid_epoch_skips_the_batches_already_done():
    x, y = blobs(40)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)  # 5 batches an epoch
    model_a = tiny_model()
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.1, momentum=0.9)
    whole = fit(model_a, loader, None, opt_a, lambda s: 0.1, 2, verbose=False)

    def stop_at_7(step):
        if step == 7:
            raise Stop  # interrupted before step 7, the third batch of epoch 1
        return 0.1

    model_b = tiny_model()
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(Stop):
        fit(model_b, loader, None, opt_b, stop_at_7, 2, verbose=False)
    seen = []
    rest = fit(model_b, loader, None, opt_b, lambda s: seen.append(s) or 0.1, 2, start_step=7, verbose=False)
    assert seen == [7, 8, 9] and rest.batch_loss == whole.batch_loss[7:]
    assert same_weights(weights(model_a), weights(model_b))


class OneShot:
    """Has a len() but gives its batches once: the second epoch is empty (a used-up generator)."""

    def __init__(self, batches):
        self.batches, self.it = batches, iter(batches)

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return self.it


def test_an_epoch_with_fewer_or_more_batches_than_len_says_is_refused():
    x, y = blobs(32)
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"0 batches in epoch 1, len\(train\) = 4"):
        fit(model, OneShot(batches), None, opt, lambda s: 0.1, 2, verbose=False)

    class Longer(list):
        def __len__(self):
            return 3
    with pytest.raises(ValueError, match=r"more batches in epoch 0, len\(train\) = 3"):
        fit(model, Longer(batches), None, opt, lambda s: 0.1, 1, verbose=False)


# ---- end_epoch, start_step, the LRs: checked before anything changes ---------------------------

def test_end_epoch_is_where_a_resumed_run_ends():
    x, y = blobs(32)
    train = Batches(x, y, 8, shuffle=False)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert len(fit(model, train, None, opt, lambda s: 0.1, end_epoch=3, start_step=4, verbose=False).batch_loss) == 8
    assert len(fit(model, train, None, opt, lambda s: 0.1, 2, verbose=False).batch_loss) == 8


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(end_epoch=2, start_step=8), ValueError, r"start_step=8 .*end_epoch=2"),  # 2 x 4 steps
    (dict(end_epoch=2, start_step=20), ValueError, "start_step=20"),
    (dict(end_epoch=2, start_step=-1), ValueError, "start_step=-1"),
    (dict(end_epoch=-1), ValueError, "end_epoch=-1"),
    (dict(end_epoch=1, cycle_ends=[3]), ValueError, "on_cycle_end and cycle_ends"),
    (dict(end_epoch=1, on_cycle_end=print), ValueError, "on_cycle_end and cycle_ends"),
    (dict(end_epoch=1, valid=[]), ValueError, "valid holds no batches"),
    (dict(end_epoch=1, train_eval=[]), ValueError, "train_eval holds no batches"),
    (dict(end_epoch=1, train=Batches(torch.rand(3, 1, 4, 4), torch.zeros(3, dtype=torch.long), 4,
                                     shuffle=False, drop_last=True)), ValueError, "train holds no batches"),
])
def test_bad_arguments_are_refused_before_any_step(kwargs, error, match):
    x, y = blobs(32)
    model = tiny_model()
    before = weights(model)
    args = dict(train=Batches(x, y, 8, shuffle=False), valid=None, opt=torch.optim.SGD(model.parameters(), lr=0.1),
                lr_at=lambda s: 0.1)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fit(model, args.pop("train"), args.pop("valid"), args.pop("opt"), args.pop("lr_at"), **args, verbose=False)
    assert same_weights(before, weights(model))


@pytest.mark.parametrize("bad, match", [(-0.05, r"lr_at\(3\) gave \[-0.05\]"),
                                        (math.nan, r"lr_at\(3\) gave \[nan\]"),
                                        (math.inf, r"lr_at\(3\) gave \[inf\]")])
def test_each_steps_lr_is_checked_before_that_step_changes_anything(bad, match):
    x, y = blobs(32)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    after_3 = {}
    with pytest.raises(ValueError, match=match):
        fit(model, Batches(x, y, 8, shuffle=False), None, opt, lambda s: bad if s == 3 else 0.1, 2, verbose=False,
            cycle_ends=[2], on_cycle_end=lambda m, step: after_3.update(weights(m)))
    assert same_weights(after_3, weights(model))  # step 3 changed nothing (BN statistics included)


# ---- raw errors from inside torch, told in words ------------------------------------------------

def bad_batch(kind, n=8):
    x, y = blobs(n)
    return {"labels out of range": (x, torch.where(y == 1, 7, y)),
            "float labels": (x, y.float()),
            "float64 images": (x.double(), y),
            "3 channels into 1": (x.expand(-1, 3, -1, -1), y),
            "labels for another batch": (x, y[:-1])}[kind]


BAD = [("labels out of range", ValueError, r"labels run 0 \.\. 7.*n_classes"),
       ("float labels", TypeError, r"labels are torch.float32.*y\.long\(\)"),
       ("float64 images", TypeError, r"images are torch.float64.*weights torch.float32"),
       ("3 channels into 1", ValueError, r"3 channels.*takes 1"),
       ("labels for another batch", ValueError, "8 images and 7 labels")]


@pytest.mark.parametrize("kind, error, match", BAD)
def test_bad_batches_get_clear_errors_in_fit_before_the_weights_change(kind, error, match):
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(error, match="fit, step 0 .epoch 0.: .*" + match):
        fit(model, [bad_batch(kind)], None, opt, lambda s: 0.1, 1, verbose=False)
    # the forward pass ran (BatchNorm's running statistics saw the images); the step did not
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("kind, error, match", BAD)
def test_bad_batches_get_clear_errors_in_evaluate_and_predict(kind, error, match):
    model = tiny_model()
    with pytest.raises(error, match="evaluate: .*" + match):
        evaluate(model, [bad_batch(kind)])
    if kind in ("float64 images", "3 channels into 1"):  # predict reads no labels
        with pytest.raises(error, match="predict: .*" + match):
            predict(model, [bad_batch(kind)])


def test_an_error_torch_raises_for_another_reason_is_passed_on_unchanged():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            raise RuntimeError("CUDA out of memory (pretend)")
    x, y = blobs(8)
    for call in (lambda m: fit(m, [(x, y)], None, torch.optim.SGD(m.parameters(), lr=0.1), lambda s: 0.1, 1),
                 lambda m: evaluate(m, [(x, y)]), lambda m: predict(m, [(x, y)])):
        with pytest.raises(RuntimeError) as info:
            call(Broken())
        assert str(info.value) == "CUDA out of memory (pretend)" and type(info.value) is RuntimeError


def test_a_last_batch_of_one_sample_with_batchnorm_says_drop_last():
    x, y = blobs(17)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"step 2 .*batch of 1\b.*drop_last=True"):
        fit(model, Batches(x, y, 8, shuffle=False), None, opt, lambda s: 0.1, 1, verbose=False)
    history = fit(model, Batches(x, y, 8, shuffle=False, drop_last=True), None, opt, lambda s: 0.1, 1, verbose=False)
    assert len(history.batch_loss) == 2


def test_evaluate_and_predict_on_zero_batches():
    model = tiny_model()
    with pytest.raises(ValueError, match="predict.*no batches"):
        predict(model, [])
    with pytest.raises(ValueError, match="evaluate.*no samples"):
        evaluate(model, iter([]))


# ---- a non-finite loss: say what was seen ------------------------------------------------------

class Line(nn.Module):
    """logits = w * x[:, :1] (N, 1) repeated into 2 columns; with loss mean(logits**2) SGD at lr
    gives w <- w (1 - 2 lr): at lr 10 it grows 19x a step, and the loss overflows first."""

    def __init__(self, w=1.0):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, x):
        return (self.w * x.flatten(1)[:, :1]).repeat(1, 2)


def square(logits, y):
    return (logits ** 2).mean()


def run_to_nan(model, loss_fn=square, lr=1e-6, x=None, y=None):
    x0, y0 = blobs(8)
    x, y = (x0 if x is None else x), (y0 if y is None else y)
    with pytest.raises(FloatingPointError) as info:
        fit(model, [(x, y)] * 4, None, torch.optim.SGD(model.parameters(), lr=lr), lambda s: lr, 50,
            loss_fn=loss_fn, verbose=False)
    return str(info.value)


def test_nan_weights_before_any_step_are_not_an_lr_problem():
    message = run_to_nan(Line(math.nan), loss_fn=nn.functional.cross_entropy)
    assert "at step 0" in message and "before any step" in message and "['w']" in message
    assert "lower the learning rate" not in message


def test_a_forward_pass_that_makes_nan_from_finite_weights_says_check_the_model():
    class LogOfNegative(Line):
        def forward(self, x):
            return torch.log(super().forward(x) - 10)
    message = run_to_nan(LogOfNegative(), loss_fn=nn.functional.cross_entropy)
    assert "from finite inputs and weights" in message and "lower the learning rate" not in message


def test_every_label_ignored_says_so():
    x, y = blobs(8)
    message = run_to_nan(tiny_model(), loss_fn=nn.functional.cross_entropy, y=torch.full_like(y, -100))
    assert "ignore_index (-100)" in message and "learning rate" not in message
    loss_fn = functools.partial(nn.functional.cross_entropy, ignore_index=3)
    assert "ignore_index (3)" in run_to_nan(tiny_model(), loss_fn=loss_fn, y=torch.full_like(y, 3))
    assert "ignore_index (3)" in run_to_nan(tiny_model(), loss_fn=nn.CrossEntropyLoss(ignore_index=3),
                                            y=torch.full_like(y, 3))


def test_nan_inputs_say_check_the_data():
    x, _ = blobs(8)
    x[0, 0, 0, 0] = math.nan
    message = run_to_nan(tiny_model(), loss_fn=nn.functional.cross_entropy, x=x)
    assert "inputs hold 1 NaN/inf" in message and "learning rate" not in message


def test_a_loss_that_grew_and_overflowed_says_lower_the_lr():
    message = run_to_nan(Line(), lr=10.0)
    assert "the loss grew from" in message and "lower the learning rate" in message


def test_outputs_that_went_nan_during_training_say_lower_the_lr():
    class GoesBad(Line):
        calls = 0

        def forward(self, x):
            GoesBad.calls += 1
            return super().forward(x) * (math.nan if GoesBad.calls == 3 else 1.0)
    message = run_to_nan(GoesBad(), loss_fn=nn.functional.cross_entropy)
    assert "at step 2" in message and "went NaN/inf" in message
    assert "lower the learning rate" in message


# ---- helpers the lessons share ------------------------------------------------------------------

def test_accuracy_of_probabilities_and_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [4.0, 0.0, 0.0]])
    y = torch.tensor([0, 1, 1, 2])
    assert accuracy(logits, y) == 0.5 == accuracy(torch.softmax(logits, 1), y)
    assert accuracy(logits, np.array([0, 1, 2, 0])) == 1.0
    for scores, labels in [(logits, y[:3]), (logits, y[:, None]), (logits[0], y[:1]), (logits[:0], y[:0])]:
        with pytest.raises(ValueError, match="accuracy: scores"):
            accuracy(scores, labels)


def test_join_histories_of_a_resumed_run_equals_the_unbroken_run():
    x, y = blobs(32)
    make = lambda: Batches(x, y, 8, shuffle=True, generator=torch.Generator().manual_seed(3))  # noqa: E731
    valid = Batches(x, y, 16, shuffle=False)
    schedule = lambda s: 0.1 / (1 + s)  # noqa: E731
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    whole = fit(model, make(), valid, opt, schedule, 3, verbose=False)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    parts = [fit(model, make(), valid, opt, schedule, 1, verbose=False),
             fit(model, make(), valid, opt, schedule, 3, start_step=4, verbose=False)]
    joined = join_histories(parts)
    for name in ("batch_loss", "batch_lr", "train_loss", "valid_loss", "valid_acc", "train_eval_loss"):
        assert getattr(joined, name) == getattr(whole, name), name
    assert len(joined.seconds) == 3 and parts[0].batch_loss == whole.batch_loss[:4]  # the parts are untouched


def test_join_histories_refuses_what_would_not_line_up():
    with_valid = History(train_loss=[1.0], valid_loss=[0.9], valid_acc=[0.5])
    with pytest.raises(ValueError, match="valid_loss"):
        join_histories([with_valid, History(train_loss=[0.8])])
    assert join_histories([with_valid, History()]).valid_loss == [0.9]  # a fit that ran no epoch adds nothing


def test_a_model_without_parameters_is_refused():
    x, y = blobs(8)
    with pytest.raises(ValueError, match="no parameters"):
        fit(nn.Flatten(), [(x, y)], None, torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1), lambda s: 0.1, 1)


def test_on_a_terminal_each_batch_says_images_a_second_and_the_seconds_left(monkeypatch, capsys):
    x, y = blobs(64)
    train = Batches(x, y, 16, shuffle=True, generator=torch.Generator().manual_seed(0))
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    fit(model, train, None, opt, lambda step: 0.05, 1)
    lines = capsys.readouterr().out.split("\r")
    progress = [line for line in lines if "batch" in line]
    assert [line.split("batch ")[1].split()[0] for line in progress] == ["1/4", "2/4", "3/4", "4/4"]
    assert all("images/s" in line and "elapsed" in line for line in progress)
    assert progress[-1].endswith(" 0s left")  # the last batch leaves nothing to do
