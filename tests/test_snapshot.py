"""Snapshots at the cycles' last steps, and ensembles that leave the model as it was."""
import os

import pytest
import torch

from minicnn.data import Batches
from minicnn.models import simple_resnet
from minicnn.schedule import cycle_end_steps, cycle_position, sgdr_lr
from minicnn.snapshot import Snapshots, ensemble_predict, predict_each
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
    history = fit(model, train, None, opt, lr_at, 7, on_cycle_end=hook, cycle_ends=ends, verbose=False)
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
    with pytest.raises(FileNotFoundError, match="other_cyc"):
        Snapshots.load(tmp_path / "snaps", name="other")


def test_bad_arguments_say_what_to_do(trained):
    model, snaps, _, _, _ = trained
    valid = Batches(*data(8, seed=1), 8, shuffle=False)
    for keep in (0, -1):  # it would hold none, and a run's snapshots would be lost
        with pytest.raises(ValueError, match=f"keep.*{keep}"):
            Snapshots(keep=keep)
    with pytest.raises(ValueError, match="no snapshots"):
        ensemble_predict(model, Snapshots(), valid)
    with pytest.raises(ValueError, match="no snapshots"):
        predict_each(model, [], valid)
    for last in (0, 4, -1):  # states[-0:] would be all of them, states[-4:] fewer than asked
        with pytest.raises(ValueError, match=f"last={last}.*3"):
            ensemble_predict(model, snaps, valid, last=last)


# --- predict_each; files written atomically and checked; every error path ---------------------------

def test_predict_each_is_each_snapshots_prediction_and_the_ensemble_is_their_mean(trained):
    model, snaps, _, _, _ = trained
    valid = Batches(*data(24, seed=1), 10, shuffle=False)
    each = predict_each(model, snaps, valid)
    assert len(each) == 3 and all(p.dtype == torch.float32 and p.device.type == "cpu" and p.shape == (24, 3)
                                  for p in each)
    for state, probs in zip(snaps.states, each):
        copy = tiny_model(seed=5)
        copy.load_state_dict(state)
        assert torch.equal(probs, predict(copy, valid))
    assert torch.equal(ensemble_predict(model, snaps, valid, last=2), sum(each[-2:]) / 2)  # what lessons compute
    assert torch.equal(ensemble_predict(model, snaps, valid), sum(each) / 3)
    assert not torch.equal(each[0], each[2])


def test_predict_each_puts_weights_and_modes_back_even_after_an_error(trained):
    model, snaps, _, _, _ = trained
    valid = Batches(*data(24, seed=1), 10, shuffle=False)
    model.train()
    model.layer_groups[1].eval()
    before, modes = {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]
    calls = []

    def fails_on_the_second(model, batches):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return predict(model, batches)
    with pytest.raises(RuntimeError, match="boom"):
        predict_each(model, snaps, valid, predict_fn=fails_on_the_second)
    assert same_state(model.state_dict(), before) and [m.training for m in model.modules()] == modes
    predict_each(model, snaps, valid)
    assert same_state(model.state_dict(), before) and [m.training for m in model.modules()] == modes


def test_predictions_that_are_not_probabilities_or_not_alike_are_refused(trained):
    model, snaps, _, _, _ = trained
    valid = Batches(*data(24, seed=1), 10, shuffle=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def logits(model, batches):
        model.eval()
        with torch.no_grad():
            return torch.cat([model(x) for x, _ in batches])
    with pytest.raises(ValueError, match="snapshot 0.*probabilities"):
        ensemble_predict(model, snaps, valid, predict_fn=logits)
    sizes = iter([24, 20, 24])
    with pytest.raises(ValueError, match=r"snapshot 1.*\(20, 3\)"):
        predict_each(model, snaps, valid, predict_fn=lambda m, b: predict(m, b)[:next(sizes)])
    labels = torch.zeros(24)  # class indices, one number per image
    with pytest.raises(ValueError, match=r"snapshot 0.*\(24,\).*probabilities"):
        predict_each(model, snaps, valid, predict_fn=lambda m, b: labels)
    nan = torch.full((24, 3), float("nan"))
    with pytest.raises(ValueError, match="snapshot 0.*probabilities"):
        predict_each(model, snaps, valid, predict_fn=lambda m, b: nan)
    assert same_state(model.state_dict(), before)


def test_one_state_dict_is_a_list_of_one(trained):
    model, snaps, _, _, _ = trained
    valid = Batches(*data(24, seed=1), 10, shuffle=False)
    assert torch.equal(predict_each(model, snaps[0], valid)[0], predict_each(model, [snaps[0]], valid)[0])
    assert torch.equal(ensemble_predict(model, snaps[1], valid), ensemble_predict(model, [snaps[1]], valid))


def test_bad_snapshots_and_batches_are_refused_and_the_weights_put_back(trained):
    model, snaps, _, _, _ = trained
    valid = Batches(*data(24, seed=1), 10, shuffle=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="batches gave no batch"):  # snapshot 1 finds it read
        predict_each(model, snaps, (b for b in valid))
    assert same_state(model.state_dict(), before)
    other = simple_resnet(5, widths=(4, 8)).state_dict()
    with pytest.raises(ValueError, match="snapshot 1 .*architecture") as refused:
        predict_each(model, [snaps[0], other], valid)
    assert "layer_groups.2.2.weight" in str(refused.value.__cause__)  # torch names the key
    assert same_state(model.state_dict(), before)
    with pytest.raises(ValueError, match="batches gave no batch"):
        predict_each(model, snaps, [])
    assert same_state(model.state_dict(), before)


def test_a_save_that_dies_half_way_leaves_the_old_snapshot_file_loadable(tmp_path, monkeypatch):
    model, snaps = tiny_model(), Snapshots()
    snaps(model, 3)
    snaps.save(tmp_path)
    old = {k: v.clone() for k, v in snaps[0].items()}
    with torch.no_grad():
        model.layer_groups[2][2].bias.fill_(7)
    again = Snapshots()
    again(model, 3)
    real_save = torch.save

    def save_half_then_die(obj, f):
        real_save(obj, f)
        f.seek(f.tell() // 2)
        f.truncate()
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        again.save(tmp_path)
    monkeypatch.undo()
    assert same_state(Snapshots.load(tmp_path)[0], old) and [p.name for p in tmp_path.iterdir()] == ["model_cyc_0.pt"]


def snapshot_file(tmp_path):
    model, snaps = tiny_model(), Snapshots()
    snaps(model, 3)
    return snaps.save(tmp_path)[0], snaps


@pytest.mark.parametrize("damage", ["bit flips", "truncated", "zero bytes", "random bytes"])
def test_a_damaged_snapshot_file_is_refused_by_name(tmp_path, damage):
    path, snaps = snapshot_file(tmp_path)
    good = path.read_bytes()
    cases = {"bit flips": [bytes(b ^ (1 << (k % 8)) if i == k * len(good) // 40 else b for i, b in enumerate(good))
                           for k in range(40)],
             "truncated": [good[:n] for n in (len(good) - 1, len(good) // 2, 10)], "zero bytes": [b""],
             "random bytes": [bytes(torch.randint(0, 256, (len(good),), dtype=torch.uint8).tolist())]}[damage]
    refused = 0
    for damaged in cases:
        path.write_bytes(damaged)
        try:
            loaded = Snapshots.load(tmp_path)
        except ValueError as error:
            assert str(path) in str(error) and "snapshot" in str(error) and "Use an earlier snapshot" in str(error)
            refused += 1
        else:  # a flip in bytes that cannot matter: the values are those saved
            assert damage == "bit flips" and same_state(loaded[0], snaps[0]) and loaded.steps == [3]
    assert refused >= len(cases) // 2  # the rest: zip metadata and padding


def test_foreign_older_renamed_and_mixed_files_are_refused(tmp_path):
    path, snaps = snapshot_file(tmp_path)
    torch.save({"state_dict": snaps[0], "step": 3, "cycle": 0}, path)  # an older minicnn's file: no checksum
    with pytest.raises(ValueError, match="model_cyc_0.pt is not a minicnn snapshot.*older"):
        Snapshots.load(tmp_path)
    torch.save(snaps[0], path)  # bare weights
    with pytest.raises(ValueError, match="is not a minicnn snapshot"):
        Snapshots.load(tmp_path)
    snaps.save(tmp_path)
    path.rename(tmp_path / "model_cyc_4.pt")
    with pytest.raises(ValueError, match="model_cyc_4.pt.*cycle 0"):
        Snapshots.load(tmp_path)
    (tmp_path / "model_cyc_4.pt").unlink()
    first = Snapshots()
    for step in (5, 10, 15):  # a run's cycles 0, 1, 2 ...
        first(tiny_model(), step)
    first.save(tmp_path)
    again = Snapshots()
    again(tiny_model(), 3)  # ... then a rerun with 1 cycle would leave cycles 1 and 2 to be mixed in
    with pytest.raises(FileExistsError, match=r"model_cyc_1.pt.*model_cyc_2.pt.*another run.*\b1 cycle"):
        again.save(tmp_path)
    assert Snapshots.load(tmp_path).steps == [5, 10, 15]  # nothing was written
    other = Snapshots(keep=1)
    for step in (2, 4, 6):  # a run with shorter cycles, of which only the last is saved
        other(tiny_model(), step)
    other.save(tmp_path)
    with pytest.raises(ValueError, match=r"model_cyc_2.pt.*step 6.*10"):
        Snapshots.load(tmp_path)


def test_wrong_folders_are_refused_by_name_and_names_taken_literally(tmp_path):
    snaps = Snapshots()
    snaps(tiny_model(), 3)
    (tmp_path / "file").write_text("x")
    for folder in ("file", "missing"):
        with pytest.raises(FileNotFoundError, match=f"model_cyc.*{folder}"):
            Snapshots.load(tmp_path / folder)
    with pytest.raises(ValueError, match="keep.*0"):
        Snapshots.load(tmp_path, keep=0)
    snaps.save(tmp_path, name="a[1]*")  # glob characters in a name are taken literally
    assert Snapshots.load(tmp_path, name="a[1]*").steps == [3]


def test_save_removes_stale_temporaries_of_every_cycle_of_its_name(tmp_path):
    import subprocess
    import sys
    from minicnn.atomic import HOST
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a save killed while writing cycle 7, which this run never saves again
    stale = [f".model_cyc_7.pt.{HOST}.{gone.pid}.0123abcd.tmp", f".model_cyc_0.pt.{HOST}.{gone.pid}.0123abcd.tmp"]
    kept = [f".other_cyc_0.pt.{HOST}.{gone.pid}.0123abcd.tmp", f".model_cyc_0.pt.{HOST}.{os.getppid()}.0123abcd.tmp"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    snaps = Snapshots()
    snaps(tiny_model(), 3)
    snaps.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["model_cyc_0.pt"])
