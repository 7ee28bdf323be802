"""Every bad command-line input of the lessons fails before any work, naming the argument.

Each case runs a lesson's script in this process (run_lesson: its command line set to argv). common.setup (seeds, threads, the output
folder), which parse_args calls once every option is checked, is replaced by one that raises
Started: a case whose error came after the checks fails with "work started" instead of
training for minutes. The last tests show that good options do reach it, so the cases below
fail for the reason they name, not for another.
"""
import argparse
import functools
import importlib
import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch

LESSONS_DIR = Path(__file__).resolve().parent.parent / "lessons"
sys.path.insert(0, str(LESSONS_DIR))
import common  # noqa: E402


class Started(Exception):
    """setup() was reached: every option had passed its checks."""


@pytest.fixture(autouse=True)
def lesson2_runs_in_tmp(monkeypatch, tmp_path):
    """lesson2's default --out (ROOT/runs/lesson2/<data>-<mode>) below tmp_path: what the
    checkout's runs/ holds (another run there is refused) must not decide these tests."""
    monkeypatch.setattr(importlib.import_module("lesson2_io"), "ROOT", tmp_path / "checkout")


@pytest.fixture(autouse=True)
def no_work(monkeypatch):
    def setup(args):
        raise Started(vars(args))
    monkeypatch.setattr(common, "setup", setup)


def run_lesson(lesson, argv):
    """Run lessons/<lesson>.py as `python lessons/<lesson>.py argv...` would, in this process: a
    lesson is a script read top to bottom, so its options are parsed where its cells begin."""
    saved = sys.argv
    sys.argv = [str(LESSONS_DIR / f"{lesson}.py"), *argv]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.argv = saved


def refused(lesson, argv, capsys):
    """Run the lesson with argv -> its error message; it must exit with status 2 before setup."""
    try:
        run_lesson(lesson, argv)
    except Started:
        pytest.fail(f"{lesson} {' '.join(argv)}: work started; the options were not refused")
    except SystemExit as e:
        assert e.code == 2, f"exit status {e.code}, not argparse's 2"
        return capsys.readouterr().err
    pytest.fail(f"{lesson} {' '.join(argv)} returned without an error")


# ---- common options (lessons/common.py), through lesson1_baseline.py ------------------------

def test_out_naming_an_existing_file(tmp_path, capsys):
    file = tmp_path / "report.txt"
    file.write_text("keep me")
    err = refused("lesson1_baseline", ["--out", str(file)], capsys)
    assert "argument --out" in err and "is a file" in err
    assert file.read_text() == "keep me"


def test_out_below_an_existing_file(tmp_path, capsys):
    (tmp_path / "report.txt").write_text("")
    err = refused("lesson1_baseline", ["--out", str(tmp_path / "report.txt" / "runs")], capsys)
    assert "argument --out" in err and "is a file" in err


@pytest.mark.parametrize("value", ["abc", "0", "-3", "1.5"])
def test_batch_size_not_a_positive_whole_number(value, capsys):
    err = refused("lesson1_baseline", ["--batch-size", value], capsys)
    assert "argument --batch-size" in err


@pytest.mark.parametrize("value", ["-1", "0", "two"])
def test_threads_not_a_positive_whole_number(value, capsys):
    err = refused("lesson1_baseline", ["--threads", value], capsys)
    assert "argument --threads" in err


@pytest.mark.parametrize("value", ["abc", "-1", str(2**32), "0.5"])
def test_seed_not_in_numpys_range(value, capsys):
    assert "argument --seed" in refused("lesson1_baseline", ["--seed", value], capsys)


@pytest.mark.parametrize("value", ["0", "-5", "99"])
def test_limit_too_small_for_a_validation_split_with_every_class(value, capsys):
    err = refused("lesson1_baseline", ["--limit", value], capsys)
    assert "argument --limit" in err and f">= {common.MIN_LIMIT}" in err and "every class" in err


def test_limit_beyond_the_data(capsys):
    err = refused("lesson1_baseline", ["--limit", "60000"], capsys)
    assert "argument --limit" in err and "54,545" in err


def test_limit_at_its_bounds_is_accepted():
    main = functools.partial(run_lesson, "lesson1_baseline")
    for limit in (common.MIN_LIMIT, common.MAX_LIMIT):
        with pytest.raises(Started):
            main(["--limit", str(limit)])


@pytest.mark.parametrize("value", ["gpu", "cpu:x", "tpu"])
def test_device_unknown(value, capsys):
    assert "argument --device" in refused("lesson1_baseline", ["--device", value], capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu(capsys):
    err = refused("lesson1_baseline", ["--device", "cuda"], capsys)
    assert "argument --device" in err and "use cpu" in err


def test_batch_size_is_a_whole_number(capsys):
    for lesson in ("lesson1_baseline", "lesson2_sgdr"):
        assert "argument --batch-size" in refused(lesson, ["--batch-size", "auto"], capsys)


# ---- each lesson's own options ---------------------------------------------------------------

CASES = [
    ("lesson1_baseline", ["--epochs", "0"], "--epochs"),
    ("lesson1_baseline", ["--lr", "0"], "--lr"),
    ("lesson1_baseline", ["--lr", "-0.1"], "--lr"),
    ("lesson1_baseline", ["--lr", "nan"], "--lr"),
    ("lesson1_baseline", ["--lr", "inf"], "--lr"),
    ("lesson2_sgdr", ["--lr", "0"], "--lr"),
    ("lesson2_sgdr", ["--train-size", "0"], "--train-size"),
    ("lesson2_sgdr", ["--train-size", "9"], "--train-size"),            # fewer images than classes
    ("lesson2_sgdr", ["--quick", "--train-size", "2000"], "--train-size"),  # the quick split has 1,024
    ("lesson2_sgdr", ["--train-size", "60000"], "--train-size"),
    ("lesson2_lr_find", ["--epochs", "0"], "--epochs"),
    ("lesson2_lr_find", ["--num-iter", "5"], "--num-iter"),
    ("lesson2_augment", ["--n-train", "5"], "--n-train"),
    ("lesson2_augment", ["--quick", "--n-train", "5000"], "--n-train"),
    ("lesson2_augment", ["--quick", "--n-valid", "500"], "--n-valid"),
    ("lesson2_augment", ["--epochs", "0"], "--epochs"),
    ("lesson2_augment", ["--lr", "-1"], "--lr"),
    ("lesson2_augment", ["--small", "30"], "--small"),
    ("lesson2_augment", ["--small-epochs", "0"], "--small-epochs"),
    ("lesson2_augment", ["--small-epochs", "3"], "--small-epochs"),      # leaves 13.25 full-size epochs
    ("lesson2_augment", ["--epochs", "1"], "--small-epochs"),            # 4 at 14px use the whole budget
    ("lesson2_fine_tune", ["--cycles", "0"], "--cycles"),
    ("lesson2_fine_tune", ["--lr-ratio", "0.5"], "--lr-ratio"),
    ("lesson2_fine_tune", ["--head-epochs", "0"], "--head-epochs"),
    ("lesson2_fine_tune", ["--frozen-epochs", "-1"], "--frozen-epochs"),
    ("lesson2_fine_tune", ["--size", "16"], "--size"),
    ("lesson2_fine_tune", ["--n-test", "20000"], "--n-test"),
    ("lesson2_fine_tune", ["--quick", "--n-train", "2000"], "--n-train"),
    ("lesson2_fine_tune", ["--quick", "--batch-size", "85"], "--batch-size"),  # 256 = 3 x 85 + 1: BatchNorm
    ("lesson2_snapshots", ["--cycles", "1"], "--cycles"),                # the resume needs two cycles
    ("lesson2_snapshots", ["--cycle-len", "0"], "--cycle-len"),
    ("lesson2_snapshots", ["--cycle-mult", "4"], "--cycle-mult"),
    ("lesson2_snapshots", ["--lr", "0"], "--lr"),
    ("lesson2_snapshots", ["--n-aug", "-1"], "--n-aug"),
    ("lesson2_snapshots", ["--quick", "--train-size", "5000"], "--train-size"),
    ("lesson2_snapshots", ["--quick", "--search-limit", "1000"], "--search-limit"),
    ("lesson2_snapshots", ["--search-limit", "0"], "--search-limit"),
    ("lesson2_labels", ["--threads", "0"], "--threads"),
    ("lesson2_labels", ["--device", "tpu"], "--device"),
    ("lesson2_labels", ["--seed", "-1"], "--seed"),
    ("lesson3_faster", ["--all", "--limit", "5000"], "--limit"),
    ("lesson3_faster", ["--accuracy", "--limit", "5000"], "--limit"),
    ("lesson3_faster", ["--all", "--accuracy"], "--accuracy"),
    ("lesson3_faster", ["--accuracy", "--sprint"], "--sprint"),
    ("lesson3_faster", ["--sprint", "--limit", "5000"], "--limit"),
    ("lesson3_faster", ["--precision", "fp16"], "--precision"),
    ("lesson3_faster", ["--lr", "0"], "--lr"),
]


@pytest.mark.parametrize("lesson, argv, name", CASES, ids=[f"{l}{' '.join(a)}" for l, a, _ in CASES])
def test_lesson_option_refused(lesson, argv, name, capsys):
    err = refused(lesson, argv, capsys)
    assert f"argument {name}" in err, err


GOOD = [
    ("lesson1_baseline", ["--quick"]), ("lesson1_baseline", ["--epochs", "1", "--lr", "1e-3", "--limit", "500"]),
    ("lesson2_sgdr", ["--quick", "--train-size", "1024"]), ("lesson2_sgdr", ["--train-size", "50000"]),
    ("lesson2_lr_find", ["--quick", "--num-iter", "10"]),
    ("lesson2_augment", ["--quick"]), ("lesson2_augment", ["--epochs", "2", "--small", "14", "--small-epochs", "4"]),
    ("lesson2_fine_tune", ["--quick"]), ("lesson2_fine_tune", ["--lr-ratio", "1", "--quick", "--batch-size", "85",
                                                               "--n-train", "255"]),
    ("lesson2_snapshots", ["--quick", "--search-limit", "512", "--n-aug", "0"]),
    ("lesson3_faster", ["--quick"]), ("lesson3_faster", ["--all"]), ("lesson3_faster", ["--accuracy"]),
    ("lesson3_faster", ["--sprint"]),
    ("lesson3_faster", ["--accuracy", "--quick", "--precision", "fp32", "--channels-last", "off"]),
]


@pytest.mark.parametrize("lesson, argv", GOOD, ids=[f"{l}{' '.join(a)}" for l, a in GOOD])
def test_good_options_reach_the_work(lesson, argv):
    """The control: these pass every check, so the cases above fail on their own bad value."""
    with pytest.raises(Started):
        run_lesson(lesson, argv)


def test_quick_defaults_follow_quick_and_the_command_line_wins():
    main = functools.partial(run_lesson, "lesson2_augment")
    with pytest.raises(Started) as started:
        main(["--quick"])
    args = started.value.args[0]
    assert (args["n_train"], args["n_valid"], args["batch_size"], args["limit"]) == (512, 102, 16, 1024)
    with pytest.raises(Started) as started:
        main(["--quick", "--batch-size", "16", "--n-valid", "50"])
    assert (started.value.args[0]["batch_size"], started.value.args[0]["n_valid"]) == (16, 50)


def test_float_above_refuses_what_is_not_a_finite_number():
    positive = common.float_above(0)
    assert positive("1e-3") == 1e-3
    for bad in ("0", "-1", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive(bad)
    assert common.float_above(1, or_equal=True)("1") == 1 and math.isfinite(common.float_above(1)("2"))


@pytest.mark.parametrize("lesson, name, limit", [
    ("lesson2_sgdr", "train_size", 1000), ("lesson2_augment", "n_train", 1000),
    ("lesson2_augment", "n_valid", 1000), ("lesson2_snapshots", "train_size", 5000)])
def test_size_defaults_shrink_to_what_limit_leaves(lesson, name, limit):
    """A --limit below a lesson's default training (or validation) size is no error: the default
    shrinks to the split; only a size given on the command line is held to it."""
    with pytest.raises(Started) as started:
        run_lesson(lesson, ["--limit", str(limit)])
    split = common.split_sizes(limit)["valid" if name == "n_valid" else "train"]
    assert started.value.args[0][name] == split


# ---- lessons/lesson2.py: a script read top to bottom; its options are lesson2_io.parse_args' ----

LESSON2 = [
    (["--cycles", "0"], "--cycles"), (["--cycles", "9"], "--cycles"),
    (["--lr-ratio", "0.5"], "--lr-ratio"), (["--lr-ratio", "nan"], "--lr-ratio"),
    (["--labelled", "5"], "--labelled"), (["--labelled", "40000"], "--labelled"),
    (["--accuracy", "--labelled", "500"], "--labelled"), (["--accuracy", "--arch", "resnet18"], "--arch"),
    (["--size", "4"], "--size"), (["--batch-size", "abc"], "--batch-size"), (["--batch-size", "auto"], "--batch-size"), (["--limit", "500"], "--limit"),
    (["--data", "/no/such/folder"], "--data"), (["--preset", "upside_down"], "--preset"),
    (["--arch", "vgg16"], "--arch"), (["--quick", "--full"], "choose one mode"),
    (["--accuracy", "--full"], "choose one mode"),
]


@pytest.mark.parametrize("argv, name", LESSON2, ids=[" ".join(a) for a, _ in LESSON2])
def test_lesson2_option_refused(argv, name, capsys):
    io = importlib.import_module("lesson2_io")
    with pytest.raises(SystemExit) as e:
        io.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and name in err, err


def test_lesson2_data_with_a_from_scratch_mode_or_the_fashion_body(tmp_path, capsys):
    io = importlib.import_module("lesson2_io")
    for argv, name in ((["--data", str(tmp_path), "--accuracy"], "--data"),
                       (["--data", str(tmp_path), "--arch", "simple_resnet"], "--arch")):
        with pytest.raises(SystemExit):
            io.parse_args(argv)
        assert f"argument {name}" in capsys.readouterr().err


def test_lesson2_modes_and_defaults():
    io = importlib.import_module("lesson2_io")
    assert io.parse_args([]).mode == "cpu"
    both = io.parse_args(["--accuracy", "--quick"])  # the accuracy run's smoke run
    assert both.mode == "quick" and both.accuracy
    for mode in ("quick", "accuracy", "full"):
        args = io.parse_args([f"--{mode}", "--out", "runs/x"])
        assert args.mode == mode and args.cache == Path("runs/x/cache")


def test_lesson2s_out_is_one_folder_a_data_and_mode_and_holds_no_other_run(tmp_path, capsys):
    """Each data and mode its own folder by default; a folder holding another run (its run.json)
    or other files is refused by name unless --overwrite; the same run may write there again."""
    io = importlib.import_module("lesson2_io")
    data = tmp_path / "pets"
    data.mkdir()
    assert io.parse_args([]).out == tmp_path / "checkout" / "runs" / "lesson2" / "fashion-mnist-cpu"
    assert io.parse_args(["--accuracy", "--quick"]).out.name == "fashion-mnist-quick-accuracy"
    assert io.parse_args(["--data", str(data), "--quick"]).out.name == "pets-quick"
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"data": "fashion-mnist", "mode": "cpu"}))
    assert io.parse_args(["--out", str(out)]).out == out  # the same run again
    for argv in (["--quick"], ["--data", str(data)]):
        with pytest.raises(SystemExit) as e:
            io.parse_args(argv + ["--out", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "argument --out" in err and "--overwrite" in err, err
        assert io.parse_args(argv + ["--out", str(out), "--overwrite"]).out == out
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        io.parse_args(["--out", str(tmp_path / "mine")])
    assert "not a lesson2 run" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_lesson2_script_refuses_before_any_work(tmp_path):
    """The script itself, not only its parser: a bad option ends it in seconds, with exit status 2."""
    import subprocess
    import time
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(LESSONS_DIR / "lesson2.py"), "--cycles", "0", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "argument --cycles" in result.stderr
    assert not list(tmp_path.iterdir()) and time.perf_counter() - started < 60
