"""A run stopped after k steps and resumed from its checkpoint ends bit for bit where the
never-stopped run ends; saving is atomic; a wrong architecture is named key by key."""
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from minicnn.atomic import atomic_write
from minicnn.checkpoint import load_checkpoint, save_checkpoint
from minicnn.data import Batches
from minicnn.models import simple_resnet
from minicnn.train import fit

EPOCHS, BATCH = 3, 10  # 48 images: 5 batches an epoch (the last one of 8), 15 steps


class Stop(Exception):
    """Stands for the interruption (a crash, a pre-empted machine) right after a save."""


def data():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (48,), generator=g)
    x = torch.rand(48, 1, 12, 12, generator=g) * 0.3
    for c in range(3):
        x[y == c, :, 4 * c:4 * c + 3] += 0.6
    return x, y


def tiny_model(seed):
    torch.manual_seed(seed)
    model = simple_resnet(3, widths=(4, 8))
    model.layer_groups[2].insert(2, nn.Dropout(0.3))  # head: pool, flatten, dropout, linear
    return model


def flip_augment(generator):
    """Random horizontal flips drawn from their own generator (minicnn.augment if present)."""
    try:
        from minicnn.augment import side_on
        return side_on(generator=generator)
    except ImportError:
        def flip(x):
            flipped = torch.rand(len(x), generator=generator) < 0.5  # (N,)
            return torch.where(flipped[:, None, None, None], x.flip(3), x)
        return flip


def optimizers(model, kind):
    if kind == "torch":
        return torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=1e-3)
    from minicnn.optim import SGD
    return SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=1e-3, nesterov=True)


def lr_at(step):
    return 0.05 * (1 - step / (EPOCHS * 5))


def run(tmp_path, kind, stop_after=None, resume=False, seed=0, frozen=False):
    """Train from scratch (or from tmp_path/ckpt.pt) -> (model, optimizer, history)."""
    model = tiny_model(seed)
    if frozen:  # the early group frozen, its BatchNorm in eval mode (a hook: code, re-applied)
        from minicnn.freeze import freeze_to
        freeze_to(model, 1, train_bn=False)
    opt = optimizers(model, kind)
    aug_gen = torch.Generator().manual_seed(seed + 1)
    train = Batches(*data(), BATCH, shuffle=True, generator=torch.Generator().manual_seed(0))
    start, hook, ends = 0, None, ()
    if resume:  # everything else was built from other seeds: the checkpoint must restore it all
        start = load_checkpoint(tmp_path / "ckpt.pt", model=model, optimizer=opt, generators={"augment": aug_gen}).step
    if stop_after is not None:
        def hook(model, step):  # after the optimizer step of step `stop_after - 1`: k steps done
            save_checkpoint(tmp_path / "ckpt.pt", model=model, optimizer=opt, step=step + 1,
                            generators={"augment": aug_gen})
            raise Stop
        ends = (stop_after - 1,)
    try:
        history = fit(model, train, None, opt, lr_at, EPOCHS, augment=flip_augment(aug_gen),
                      on_cycle_end=hook, cycle_ends=ends, start_step=start, verbose=False)
    except Stop:
        history = None
    return model, opt, history


@pytest.mark.parametrize("kind", ["torch", "minicnn"])
@pytest.mark.parametrize("k", [7, 10])  # mid-epoch, and at an epoch's end
def test_a_resumed_run_ends_bit_identical_to_the_never_stopped_run(tmp_path, kind, k):
    if kind == "minicnn":
        pytest.importorskip("minicnn.optim")
    torch.manual_seed(123)
    whole, whole_opt, whole_history = run(tmp_path, kind)
    torch.manual_seed(123)  # the same global RNG at the start: dropout masks
    run(tmp_path, kind, stop_after=k)
    torch.manual_seed(999)  # the resumed process starts elsewhere; load_checkpoint must fix it
    resumed, resumed_opt, resumed_history = run(tmp_path, kind, resume=True, seed=7)
    assert resumed_history.batch_loss == whole_history.batch_loss[k:]
    for name, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    for a, b in zip(whole_opt.state_dict()["state"].values(), resumed_opt.state_dict()["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_a_frozen_run_resumes_exactly_when_freeze_to_is_called_again(tmp_path):
    pytest.importorskip("minicnn.freeze")
    torch.manual_seed(123)
    whole, _, whole_history = run(tmp_path, "torch", frozen=True)
    torch.manual_seed(123)
    run(tmp_path, "torch", stop_after=7, frozen=True)
    resumed, _, resumed_history = run(tmp_path, "torch", resume=True, seed=7, frozen=True)
    assert resumed_history.batch_loss == whole_history.batch_loss[7:]
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), whole.state_dict().values()))
    early = whole.layer_groups[0][1][1]  # a BatchNorm of the frozen group: its statistics never moved
    assert torch.equal(early.running_mean, torch.zeros_like(early.running_mean))


def test_without_the_rng_states_the_resume_would_differ(tmp_path):
    """The control: the same resume with the augmentation generator left out drifts away."""
    torch.manual_seed(123)
    whole, _, _ = run(tmp_path, "torch")
    torch.manual_seed(123)
    run(tmp_path, "torch", stop_after=7)
    model = tiny_model(7)
    opt = optimizers(model, "torch")
    step = load_checkpoint(tmp_path / "ckpt.pt", model=model, optimizer=opt).step  # no generators
    train = Batches(*data(), BATCH, shuffle=True, generator=torch.Generator().manual_seed(0))
    fit(model, train, None, opt, lr_at, EPOCHS, augment=flip_augment(torch.Generator().manual_seed(8)),
        start_step=step, verbose=False)
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), whole.state_dict().values()))


def test_freeze_state_global_rngs_and_extra_round_trip(tmp_path):
    model = tiny_model(0)
    for p in model.layer_groups[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=4, extra={"epoch": 0, "loss": [1.5]})
    expected = random.random(), np.random.rand(), torch.rand(1)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    fresh = tiny_model(5)
    later_groups = [p for group in fresh.layer_groups[1:] for p in group.parameters()]
    resumed = load_checkpoint(tmp_path / "c.pt", model=fresh, optimizer=torch.optim.SGD(later_groups, lr=0.1))
    assert resumed == (4, {"epoch": 0, "loss": [1.5]}) and resumed.step == 4
    assert [p.requires_grad for p in fresh.parameters()] == [p.requires_grad for p in model.parameters()]
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_an_interrupted_save_leaves_the_old_checkpoint_loadable(tmp_path, monkeypatch):
    model = tiny_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=1)
    real_save = torch.save

    def save_half_then_die(obj, f):
        real_save(obj, f)
        f.seek(f.tell() // 2)
        f.truncate()  # half the bytes are written ...
        raise KeyboardInterrupt  # ... when the process is stopped
    monkeypatch.setattr(torch, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=2)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt).step == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o666 & ~umask  # like any file open() makes


def test_a_different_architecture_names_the_keys(tmp_path):
    model = tiny_model(0)
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), step=0)

    def error_for(other):
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(ValueError, match="different architecture") as error:
            load_checkpoint(tmp_path / "c.pt", model=other, optimizer=torch.optim.SGD(other.parameters(), lr=0.1))
        assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())  # nothing loaded
        return str(error.value)

    wider = simple_resnet(5, widths=(4, 8, 16))
    wider.layer_groups[2].insert(2, nn.Dropout(0.3))
    assert "'layer_groups.1.2.0.weight'" in error_for(wider)  # a block the saved model lacks
    message = error_for(simple_resnet(3, widths=(4, 8)))  # no dropout: the linear layer moved
    assert all(f"'layer_groups.2.{i}.{p}'" in message for i in (2, 3) for p in ("weight", "bias"))
    five = simple_resnet(5, widths=(4, 8))
    five.layer_groups[2].insert(2, nn.Dropout(0.3))
    message = error_for(five)  # the same keys; only the last layer's shapes differ
    assert "['layer_groups.2.3.bias', 'layer_groups.2.3.weight']" in message


def test_bad_input(tmp_path):
    model = tiny_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"step.*-1"):
        save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=-1)
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=0)
    other = tiny_model(1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(KeyError, match="augment"):  # a generator the file has no state for
        load_checkpoint(tmp_path / "c.pt", model=other, optimizer=torch.optim.SGD(other.parameters(), lr=0.1),
                        generators={"augment": torch.Generator()})
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())  # nothing loaded
    with pytest.raises(ValueError):  # other param groups: refused before the model is touched
        load_checkpoint(tmp_path / "c.pt", model=other, optimizer=torch.optim.SGD(list(other.parameters())[1:], lr=0.1))
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ValueError, match=r"weights\.pt is not a minicnn checkpoint"):
        load_checkpoint(tmp_path / "weights.pt", model=model, optimizer=opt)


# --- what saves must load; stale temporaries; checksum; the optimizer's class -----------------------

def small_checkpoint(path, step=3):
    """A small model and a momentum SGD after one step, saved with some extra -> (model, opt, extra)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    extra = {"loss": [1.5, 0.25], "args": {"lr": 0.1, "out": "runs/x"}, "best": torch.tensor(0.75)}
    save_checkpoint(path, model=model, optimizer=opt, step=step, extra=extra)
    return model, opt, extra


def fresh():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    return model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)


def states(model, opt):
    return {**{f"model.{k}": v.clone() for k, v in model.state_dict().items()},
            **{f"opt.{i}": s["momentum_buffer"].clone() for i, s in opt.state_dict()["state"].items()},
            "lr": opt.param_groups[0]["lr"]}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                                        for k in a)


def _history():
    from minicnn.train import History
    return History()


@pytest.mark.parametrize("bad, where", [
    (lambda: {"history": _history()}, r"extra\['history'\] is a minicnn\.train\.History"),
    (lambda: {"loss": np.float64(0.5)}, r"extra\['loss'\] is a numpy\.float64"),
    (lambda: {"epoch": np.int64(2)}, r"extra\['epoch'\] is a numpy\.int64"),
    (lambda: {"args": {"lr": 0.1, "out": Path("runs/x")}}, r"extra\['args'\]\['out'\] is a pathlib\.\w*Path"),
    (lambda: {"seen": [1, {2, 3}]}, r"extra\['seen'\]\[1\] is a builtins\.set"),
    (lambda: {"rng": random.Random(0)}, r"extra\['rng'\] is a random\.Random"),
], ids=["History", "numpy float", "numpy int", "Path in vars(args)", "set", "object"])
def test_an_extra_that_would_not_load_is_refused_by_name_before_the_old_file_is_touched(tmp_path, bad, where):
    model, opt, _ = small_checkpoint(tmp_path / "c.pt")
    before = (tmp_path / "c.pt").read_bytes()
    with pytest.raises(TypeError, match=where + ".*weights_only"):
        save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=4, extra=bad())
    assert (tmp_path / "c.pt").read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    assert load_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt).step == 3


def test_every_kind_of_plain_extra_saves_and_loads_back_equal(tmp_path):
    model, opt = fresh()
    extra = {"none": None, "flags": (True, False), "int": -7, "big": 2 ** 100, "float": -0.0, "nan": float("nan"),
             "str": "é\n", "bytes": b"\x00\xff", "nested": [{"a": [1, (2, 3)]}, []], 5: "int key", (1, 2): "tuple key",
             "dtype": torch.bfloat16, "size": torch.Size([2, 3]), "t": torch.arange(6).view(2, 3).t(),
             "half": torch.ones(2, dtype=torch.float16), "bool_t": torch.tensor([True, False]), "scalar": torch.tensor(3.5)}
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=0, extra=extra)
    back = load_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt).extra
    assert back.keys() == extra.keys()
    for key, value in extra.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(back[key], value) and back[key].dtype == value.dtype, key
        elif key == "nan":
            assert back[key] != back[key]
        else:
            assert back[key] == value and type(back[key]) is type(value), key
    assert str(back["float"]) == "-0.0"


@pytest.mark.parametrize("step", [True, False, np.int64(3), 2.0, "3"])
def test_a_step_that_is_not_an_int_is_refused(tmp_path, step):
    model, opt = fresh()
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=step)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_the_same_target_are_removed_by_the_next_save(tmp_path):
    import subprocess
    import sys
    from minicnn.atomic import HOST
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid now belongs to no process
    dead, alive = gone.pid, os.getppid()
    names = {f".c.pt.{HOST}.{dead}.0123abcd.tmp": "stale", f".c.pt.{dead}.89abcdef.tmp": "stale",  # older name
             f".c.pt.{HOST}.{alive}.0123abcd.tmp": "kept",  # its process may still be writing it
             f".c.pt.otherhost.{dead}.0123abcd.tmp": "kept",  # a pid of another machine says nothing here
             f".d.pt.{HOST}.{dead}.0123abcd.tmp": "kept", "c.pt.bak": "kept"}  # not c.pt's temporaries
    for name in names:
        (tmp_path / name).write_bytes(b"x" * 100)
    model, opt = fresh()
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=0)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["c.pt"] + [n for n, what in names.items() if what == "kept"])


def test_a_full_disk_during_the_save_keeps_the_old_checkpoint_and_says_so(tmp_path, monkeypatch):
    import errno
    import io
    model, opt, _ = small_checkpoint(tmp_path / "c.pt")

    class FullDisk(io.FileIO):  # half the bytes fit, then the disk is full
        def write(self, data):
            super().write(bytes(data)[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fdopen", FullDisk)
    with pytest.raises(OSError, match=r"c\.pt was not written") as error:
        save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=9)
    monkeypatch.undo()
    assert error.value.errno == errno.ENOSPC
    assert load_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt).step == 3
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_a_folder_that_cannot_be_written_names_the_target_and_keeps_the_old_file(tmp_path, monkeypatch):
    """The tests run as root, which chmod cannot keep out of a folder: os.open refuses to create the
    temporary file here as it does in a folder without write permission for its user."""
    import errno
    model, opt, _ = small_checkpoint(tmp_path / "c.pt")
    real_open = os.open

    def refused(path, flags, *args):
        if flags & os.O_CREAT:  # creating a file in the folder
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)
    monkeypatch.setattr(os, "open", refused)
    with pytest.raises(PermissionError, match=r"c\.pt was not written") as error:
        save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=9)
    monkeypatch.undo()
    assert error.value.errno == errno.EACCES and ".tmp" not in str(error.value)  # the target, not the temporary
    assert load_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt).step == 3
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_single_bit_flips_are_refused_by_name_and_never_load_altered_values(tmp_path):
    """200 single-bit flips spread over a small checkpoint: each is refused with the file's name, or (in bytes
    that cannot matter, e.g. zip metadata) loads values identical to the saved ones; none loads altered ones."""
    model, opt, extra = small_checkpoint(tmp_path / "c.pt")
    saved, good = states(model, opt), (tmp_path / "c.pt").read_bytes()
    refused = identical = 0
    for k in range(200):
        position = k * len(good) // 200 + k % 7  # spread over the file, not only at multiples of 8
        flipped = bytearray(good)
        flipped[position] ^= 1 << (k % 8)
        path = tmp_path / "flipped.pt"
        path.write_bytes(bytes(flipped))
        target, target_opt = fresh()
        before = states(target, target_opt)
        try:
            resumed = load_checkpoint(path, model=target, optimizer=target_opt)
        except ValueError as error:
            assert str(path) in str(error) and ("damaged" in str(error) or "not a minicnn checkpoint" in str(error))
            assert "earlier checkpoint" in str(error)  # what to do
            assert same(states(target, target_opt), before), f"byte {position}: refused, yet something changed"
            refused += 1
        else:
            assert same(states(target, target_opt), saved), f"byte {position}: loaded altered values"
            assert resumed.step == 3 and resumed.extra["loss"] == extra["loss"]
            assert torch.equal(resumed.extra["best"], extra["best"])
            identical += 1
    assert refused + identical == 200 and refused >= 150  # most bytes are payload: the checksum sees them


@pytest.mark.parametrize("damage", ["truncated", "half", "zero bytes", "random bytes", "text"])
def test_a_damaged_file_is_refused_with_its_name_and_what_to_do(tmp_path, damage):
    small_checkpoint(tmp_path / "c.pt")
    good = (tmp_path / "c.pt").read_bytes()
    damaged = {"truncated": good[:-10], "half": good[:len(good) // 2], "zero bytes": b"",
               "random bytes": bytes(torch.randint(0, 256, (len(good),), dtype=torch.uint8).tolist()),
               "text": b"step: 3\n"}[damage]
    (tmp_path / "c.pt").write_bytes(damaged)
    model, opt = fresh()
    before = states(model, opt)
    with pytest.raises(ValueError, match=r"c\.pt cannot be read as a checkpoint.*earlier checkpoint"):
        load_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt)
    assert same(states(model, opt), before)


def test_an_older_newer_or_foreign_file_and_wrong_paths_are_refused_clearly(tmp_path):
    model, opt = fresh()
    torch.save({"format": "minicnn-checkpoint-1", "model": model.state_dict()}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"old\.pt is not a minicnn checkpoint.*older"):
        load_checkpoint(tmp_path / "old.pt", model=model, optimizer=opt)
    newer = {"format": "minicnn-checkpoint-3", "sha256": "", "contents": {}}
    torch.save(newer, tmp_path / "new.pt")
    with pytest.raises(ValueError, match=r"new\.pt is not a minicnn checkpoint.*newer"):
        load_checkpoint(tmp_path / "new.pt", model=model, optimizer=opt)
    with pytest.raises(FileNotFoundError, match=r"checkpoint file at .*missing\.pt"):
        load_checkpoint(tmp_path / "missing.pt", model=model, optimizer=opt)
    with pytest.raises(FileNotFoundError, match="checkpoint file"):  # a folder
        load_checkpoint(tmp_path, model=model, optimizer=opt)
    with pytest.raises(IsADirectoryError, match="was not written"):  # the folder is kept
        save_checkpoint(tmp_path, model=model, optimizer=opt, step=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.pt", "old.pt"]


def test_a_checksum_that_does_not_match_is_refused(tmp_path):
    """A file rewritten with one weight changed and the old checksum kept: refused as damaged."""
    model, opt, _ = small_checkpoint(tmp_path / "c.pt")
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    saved["contents"]["model"]["0.weight"][0, 0] += 1e-3
    torch.save(saved, tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"c\.pt is damaged.*sha256"):
        load_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt)


@pytest.mark.parametrize("saved_with", ["torch SGD", "torch Adam"])
def test_a_checkpoint_of_another_optimizer_class_is_refused_before_anything_changes(tmp_path, saved_with):
    from minicnn.optim import SGD
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if saved_with == "torch SGD"
           else torch.optim.Adam(model.parameters(), lr=0.1))
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=1)
    target = nn.Linear(4, 3)
    mine = SGD(target.parameters(), lr=0.5, momentum=0.9)
    before_model = {k: v.clone() for k, v in target.state_dict().items()}
    before_opt = mine.state_dict()
    with pytest.raises(ValueError, match=r"torch\.optim\.\w+\.(SGD|Adam).*minicnn\.optim\.SGD"):
        load_checkpoint(tmp_path / "c.pt", model=target, optimizer=mine)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before_model.items())
    assert mine.state_dict() == before_opt and mine.param_groups[0]["lr"] == 0.5


def test_a_history_saved_as_the_error_advises_loads_back_equal(tmp_path):
    import dataclasses
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    history = fit(model, Batches(x, y, 4, shuffle=False), Batches(x, y, 8, shuffle=False), opt, lambda s: 0.1, 2,
                  verbose=False)
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=8, extra={"history": dataclasses.asdict(history)})
    extra = load_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt).extra
    assert extra["history"] == dataclasses.asdict(history) and len(extra["history"]["batch_loss"]) == 8


def test_atomic_write_writes_text_and_bytes_and_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    import errno
    import io
    report = tmp_path / "runs" / "report.md"
    assert atomic_write(report, "# a report\n") == report  # the folder is made
    assert report.read_text() == "# a report\n"
    atomic_write(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"

    class FullDisk(io.FileIO):  # half the bytes fit, then the disk is full
        def write(self, data):
            super().write(bytes(data)[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fdopen", FullDisk)
    with pytest.raises(OSError, match=r"report\.md was not written"):
        atomic_write(report, "# a longer report that does not fit\n" * 10)
    monkeypatch.undo()
    assert report.read_text() == "# a report\n"
    assert [p.name for p in report.parent.iterdir()] == ["report.md"]
    with pytest.raises(IsADirectoryError, match="was not written"):  # a folder is never replaced
        atomic_write(tmp_path, "x")
    assert report.read_text() == "# a report\n"
