"""Snapshots at the cycles' last steps, and ensembles that leave the model as it was."""
import pytest
import torch

from minicnn.data import Batches
from minicnn.models import simple_resnet
from minicnn.schedule import cycle_end_steps, cycle_position, sgdr_lr
from minicnn.snapshot import Snapshots, ensemble_predict
from minicnn.train import fit, predict

STEPS_PER_CYCLE, CYCLE_MULT, N_CYCLES = 4, 2, 3  # cycles of 4, 8, 16 steps


def data(n=32, seed=0):
    """Three classes of 1x8x8 images: a bright row band at the top, middle or bottom."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.3
    for c in range(3):
        x[y == c, :, 3 * c:3 * c + 2] += 0.6
    return x, y


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return simple_resnet(3, widths=(4, 8))


def lr_at(step):
    return sgdr_lr(step, steps_per_cycle=STEPS_PER_CYCLE, cycle_mult=CYCLE_MULT, lr_max=0.1)


@pytest.fixture(scope="module")
def trained():
    """A 3-cycle SGDR run (28 steps) with a Snapshots hook; the weights at each call recorded too."""
    torch.manual_seed(0)
    train = Batches(*data(), 8, shuffle=True, generator=torch.Generator().manual_seed(0))
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    snaps, seen = Snapshots(), []

    def hook(model, step):
        snaps(model, step)
        seen.append({k: v.clone() for k, v in model.state_dict().items()})

    ends = cycle_end_steps(N_CYCLES, steps_per_cycle=STEPS_PER_CYCLE, cycle_mult=CYCLE_MULT)
    history = fit(model, train, None, opt, lr_at, epochs=7, on_cycle_end=hook, cycle_ends=ends, verbose=False)
    return model, snaps, seen, history, ends


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_snapshot_at_the_last_step_of_each_cycle_where_the_lr_is_the_cycles_minimum(trained):
    model, snaps, seen, history, ends = trained
    assert ends == [3, 11, 27] and snaps.steps == ends and snaps.cycles == [0, 1, 2]
    lrs = [lr[0] for lr in history.batch_lr]
    for k, end in enumerate(ends):
        start = 0 if k == 0 else ends[k - 1] + 1
        cycle, t, cycle_steps = cycle_position(end, steps_per_cycle=STEPS_PER_CYCLE, cycle_mult=CYCLE_MULT)
        assert (cycle, t) == (k, cycle_steps - 1)  # the cycle's last step
        assert lrs[end] == min(lrs[start:end + 1]) == lr_at(end)  # taken at the minimum, not a step after
        if end + 1 < len(lrs):
            assert lrs[end + 1] == 0.1  # the next step restarts at lr_max
    # each snapshot holds the weights as they were at its call, and later training did not touch it
    for state, at_call in zip(snaps.states, seen):
        assert same_state(state, at_call) and all(t.device.type == "cpu" for t in state.values())
    assert same_state(snaps[-1], model.state_dict())  # the run ends with a cycle
    assert not same_state(snaps[0], snaps[1])


def test_an_ensemble_of_one_snapshot_is_that_snapshots_prediction(trained):
    model, snaps, _, _, _ = trained
    valid = Batches(*data(24, seed=1), 10, shuffle=False)
    for i in range(len(snaps)):
        copy = tiny_model(seed=5)
        copy.load_state_dict(snaps[i])
        assert torch.equal(ensemble_predict(model, [snaps[i]], valid), predict(copy, valid))
    assert torch.equal(ensemble_predict(model, snaps, valid, last=1), predict(model, valid))


def test_the_ensemble_averages_probabilities_of_the_last_m(trained):
    model, snaps, _, _, _ = trained
    valid = Batches(*data(24, seed=1), 10, shuffle=False)
    one = [ensemble_predict(model, [s], valid) for s in snaps.states]
    torch.testing.assert_close(ensemble_predict(model, snaps, valid, last=2), (one[1] + one[2]) / 2)
    probs = ensemble_predict(model, snaps, valid)
    torch.testing.assert_close(probs, sum(one) / 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(24))  # probabilities, not logits


def test_ensemble_predict_leaves_weights_modes_and_parameters_as_they_were(trained):
    model, snaps, _, _, _ = trained
    valid = Batches(*data(24, seed=1), 10, shuffle=False)
    model.train()
    model.layer_groups[0].eval()  # a frozen group's BatchNorm kept in eval mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    modes = [m.training for m in model.modules()]
    ensemble_predict(model, snaps, valid, last=2)
    assert same_state(model.state_dict(), before)
    assert [m.training for m in model.modules()] == modes
    assert all(a is b for a, b in zip(model.parameters(), params))  # an optimizer still holds them

    def broken(model, batches):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        ensemble_predict(model, snaps, valid, predict_fn=broken)
    assert same_state(model.state_dict(), before) and [m.training for m in model.modules()] == modes


def test_predict_fn_is_called_once_per_snapshot_with_its_weights(trained):
    model, snaps, _, _, _ = trained
    valid = Batches(*data(24, seed=1), 10, shuffle=False)
    calls = []

    def tta_like(model, batches):
        calls.append({k: v.clone() for k, v in model.state_dict().items()})
        return predict(model, batches)

    probs = ensemble_predict(model, snaps, valid, last=2, predict_fn=tta_like)
    assert len(calls) == 2 and same_state(calls[0], snaps[1]) and same_state(calls[1], snaps[2])
    torch.testing.assert_close(probs, ensemble_predict(model, snaps, valid, last=2))


def test_with_tta_of_the_identity_the_ensemble_equals_the_plain_ensemble(trained):
    predict_tta = pytest.importorskip("minicnn.tta").predict_tta
    model, snaps, _, _, _ = trained
    valid = Batches(*data(24, seed=1), 10, shuffle=False)

    def tta(model, batches):
        return predict_tta(model, batches, augment=lambda x: x, n_aug=2)

    torch.testing.assert_close(ensemble_predict(model, snaps, valid, predict_fn=tta),
                               ensemble_predict(model, snaps, valid))


def test_keep_holds_the_latest_and_remembers_their_cycles():
    model, snaps = tiny_model(), Snapshots(keep=2)
    for step in (3, 11, 27):
        with torch.no_grad():
            model.layer_groups[2][2].bias.fill_(step)
        snaps(model, step)
    assert len(snaps) == 2 and snaps.steps == [11, 27] and snaps.cycles == [1, 2]
    assert snaps[0]["layer_groups.2.2.bias"][0] == 11


def test_save_and_load_a_folder_of_cycle_files_in_cycle_order(tmp_path):
    model, snaps = tiny_model(), Snapshots()
    for step in range(11):  # cyc_10 must come after cyc_9, not after cyc_1
        with torch.no_grad():
            model.layer_groups[2][2].bias.fill_(step)
        snaps(model, step)
    paths = snaps.save(tmp_path / "snaps", name="fmnist")
    assert [p.name for p in paths][:2] == ["fmnist_cyc_0.pt", "fmnist_cyc_1.pt"] and len(paths) == 11
    loaded = Snapshots.load(tmp_path / "snaps", name="fmnist")
    assert loaded.cycles == list(range(11)) and loaded.steps == list(range(11))
    assert all(same_state(a, b) for a, b in zip(loaded.states, snaps.states))
    assert Snapshots.load(tmp_path / "snaps", name="fmnist", keep=3).cycles == [8, 9, 10]
    with pytest.raises(FileNotFoundError, match="no snapshots other_cyc"):
        Snapshots.load(tmp_path / "snaps", name="other")


def test_bad_arguments_say_what_to_do(trained):
    model, snaps, _, _, _ = trained
    valid = Batches(*data(8, seed=1), 8, shuffle=False)
    with pytest.raises(ValueError, match="keep must be a positive int"):
        Snapshots(keep=0)
    with pytest.raises(ValueError, match="no snapshots to ensemble"):
        ensemble_predict(model, Snapshots(), valid)
    for last in (0, 4, 1.5):
        with pytest.raises(ValueError, match="choose between 1 and the 3 snapshots"):
            ensemble_predict(model, snaps, valid, last=last)
