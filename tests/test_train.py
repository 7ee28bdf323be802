"""fit, evaluate, predict on tiny problems: the loss falls, the schedule is obeyed, order kept."""
import math

import pytest
import torch
from torch import nn

from minicnn.data import Batches
from minicnn.models import simple_resnet
from minicnn.train import History, evaluate, fit, predict


def blobs(n=96, seed=0):
    """Two classes of 1x4x4 images: bright in the top half or in the bottom half."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 1, 4, 4, generator=g) * 0.3
    x[y == 0, :, :2] += 0.6
    x[y == 1, :, 2:] += 0.6
    return x, y


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return simple_resnet(2, widths=(4, 4))


def test_fit_lowers_the_loss_and_records_the_lr_of_every_step():
    x, y = blobs()
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
    np = pytest.importorskip("numpy")
    history = fit(model, train, None, opt, lambda step: np.float32(0.5), 1, verbose=False)
    assert history.batch_lr[0] == [0.5, 0.5, 0.5]  # one number of any real type: every group
    with pytest.raises(ValueError, match="2 learning rates for 3 param groups"):
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


def test_history_by_hand():
    history = History(train_loss=[1.0, 0.5], valid_loss=[0.9, 0.6], valid_acc=[0.5, 0.7])
    assert history.batch_loss == [] and history.valid_acc[-1] == 0.7


def test_errors():
    x, y = blobs(8)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="empty"):
        fit(model, Batches(x, y, 16, shuffle=False, drop_last=True), None, opt, lambda s: 0.1, 1)
    with pytest.raises(ValueError, match="start_step"):
        fit(model, Batches(x, y, 4, shuffle=False), None, opt, lambda s: 0.1, 1, start_step=-1)
