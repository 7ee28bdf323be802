"""The benchmarks CI runs, in their --quick forms: gpu_check.py runs its four parts on the CPU
and prints their table, the time-to-accuracy benchmark among them with every arm (fastai possibly
skipped, with the line that says how to install it); and the rules those tables rest on: the
seconds to a threshold, the check that every arm had lesson2's settings, the command that runs
lesson2 as the minicnn arm."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_data


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_time_to_accuracy import ARMS, THRESHOLDS, lesson3_result, minicnn_result, seconds_to  # noqa: E402

# PASSIVE: OpenMP threads sleep instead of spinning when the cores are busy (as in test_lessons)
ENV = {**os.environ, "MPLBACKEND": "Agg", "OMP_WAIT_POLICY": "PASSIVE"}


def run(script, *options, timeout=300):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *options], capture_output=True,
                            text=True, timeout=timeout, cwd=ROOT, env=ENV)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def table_rows(text):
    """The rows of a markdown table in text -> {first cell: [cells]}."""
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                          for line in text.splitlines() if line.startswith("| ") and "---" not in line)}


# ---- seconds to a threshold ------------------------------------------------------------------------

def test_seconds_to_is_the_first_epoch_at_or_above_the_threshold():
    curve = [(10.0, 0.90), (20.0, 0.925), (30.0, 0.915), (40.0, 0.93), (50.0, 0.95)]
    assert seconds_to(curve, 0.92) == 20.0   # the first epoch above, not the best one (50 s)
    assert seconds_to(curve, 0.925) == 20.0  # at the threshold counts
    assert seconds_to(curve, 0.93) == 40.0   # the dip at 30 s does not count as reaching 0.93
    assert seconds_to(curve, 0.0) == 10.0


def test_seconds_to_a_threshold_never_reached_is_none():
    curve = [(10.0, 0.90), (20.0, 0.9299)]
    assert seconds_to(curve, 0.93) is None
    assert seconds_to([], 0.5) is None  # an arm that ran no epoch


# ---- lesson2's settings, and the check that every arm had them ---------------------------------------

def test_a_lesson2_run_with_another_network_is_refused():
    s = dict(widths=[16, 32, 64], batch_size=128, way="fp32")
    results = dict(settings=dict(WIDTHS="(16, 32, 64)", BATCH_SIZE="128", WAY="'fp32'"), valid_curve=[[5.0, 0.9]],
                   test=0.9, chosen="last weights")
    assert minicnn_result(results, s, source="test")["curve"] == [(5.0, 0.9)]
    for key, other in (("WIDTHS", "(64, 128, 256)"), ("WAY", "'bf16 + channels_last'")):
        changed = dict(results, settings=dict(results["settings"], **{key: other}))
        with pytest.raises(SystemExit, match=key):
            minicnn_result(changed, s, source="test")


def test_a_lesson3_run_in_another_way_is_refused():
    arm = dict(curve=[[5.0, 0.93]], test=0.93, predicted="mirror TTA", features=["ema", "whiten"],
               widths=[16, 32, 64, 128], schedule="one cosine of 6 epochs from lr 0.2")
    results = dict(way="fp32", results={"the sprint": arm})
    r = lesson3_result(results, dict(way="fp32"))
    assert r["curve"] == [(5.0, 0.93)] and r["test"] == 0.93 and "one cosine" in r["lr"]
    with pytest.raises(SystemExit, match="lesson3_faster trained in fp32, the other arms in channels_last"):
        lesson3_result(results, dict(way="channels_last"))


# ---- bad arguments: refused by name before any work ---------------------------------------------------

BAD_ARGUMENTS = [
    ("bench_time_to_accuracy.py", ["--arm-timeout", "-5"], "--arm-timeout: -5 is out of range"),
    ("bench_time_to_accuracy.py", ["--epochs", "0"], "--epochs: 0 is out of range"),
    ("bench_time_to_accuracy.py", ["--max-lr", "inf"], "--max-lr inf: must be a finite number > 0"),
    ("bench_time_to_accuracy.py", ["--order", "plain,foo"], "--order plain,foo: give each of"),
    ("bench_time_to_accuracy.py", ["--minicnn-results", "no/such.json"], "--minicnn-results: no/such.json: no such"),
    ("bench_time_to_accuracy.py", ["--out", "README.md/x"], "--out: README.md is a file"),
    ("bench_loop.py", ["--repeats", "0"], "--repeats: 0 is out of range"),
    ("bench_loop.py", ["--device", "foo"], "--device: device 'foo' is not a device"),
    ("bench_distributed.py", ["--rounds", "0"], "--rounds: 0 is out of range"),
    ("bench_optim.py", ["--steps", "0"], "--steps: 0 is out of range"),
    ("bench_augment.py", ["--reps", "0"], "--reps: 0 is out of range"),
    ("bench_precompute.py", ["--n", "0"], "--n: 0 is out of range"),
    ("gpu_check.py", ["--threads", "0"], "--threads: 0 is out of range"),
    ("gpu_check.py", ["--limits", "1,2,3,inf"], "--limits: give 4 finite numbers"),
    ("gpu_check.py", ["--headroom-gib", "0"], "--headroom-gib: 0 is out of range"),
]


@pytest.mark.parametrize("script, options, message", BAD_ARGUMENTS,
                         ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_a_bad_argument_is_refused_by_name_before_any_work(script, options, message, monkeypatch, capsys):
    """In-process: main() exits with argparse's status 2 and names the argument; in the scripts that
    load Fashion-MNIST, a stub in place of load_fashion_mnist fails the test if it is reached first."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"_bench_{script[:-3]}", ROOT / "benchmarks" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def reached(*args, **kwargs):
        raise AssertionError("the data was loaded before the arguments were checked")
    for loader in ("load_fashion_mnist", "fashion_splits"):  # in the scripts that train on it
        if hasattr(module, loader):
            monkeypatch.setattr(module, loader, reached)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [script, *options])
    with pytest.raises(SystemExit) as exit_:
        module.main(options) if script == "bench_time_to_accuracy.py" else module.main()
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


# ---- the scripts, end to end ------------------------------------------------------------------------

@pytest.mark.parametrize("arm, lesson, mode", [("minicnn", "lesson2.py", "--accuracy"),
                                               ("sprint", "lesson3_faster.py", "--sprint"),
                                               ("faster", "lesson3_faster.py", "--accuracy")])
def test_the_lesson_arms_run_their_lesson_in_the_other_arms_way(monkeypatch, tmp_path, arm, lesson, mode):
    """Without --minicnn-results the benchmark runs lesson2 itself, and lesson3_faster for the sprint
    and faster arms, forced to the way of running a step (precision, layout) the other arms use."""
    import bench_time_to_accuracy as bench
    commands = []

    def fake_run(command, **kwargs):
        commands.append(command)
        raise subprocess.TimeoutExpired(command, 1)  # stop there: the command is what is tested
    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    args = bench.parse_args(["--quick", "--out", str(tmp_path), "--threads", "1"])
    for way in ("fp32", "channels_last", "bf16 + channels_last"):
        s = dict(mode="quick", way=way, **bench.speed.WAYS[way])
        assert "failed" in bench.run_arm(arm, args, s)
        command = commands[-1]
        assert command[1].endswith(lesson) and mode in command and "--quick" in command
        precision, layout = (command[command.index(flag) + 1] for flag in ("--precision", "--channels-last"))
        assert (precision == "bf16", layout == "on") == (s["mixed_precision"], s["channels_last"])


@pytest.mark.slow
@needs_data
def test_gpu_check_runs_every_part_quick_on_the_cpu(tmp_path):
    out = run("gpu_check.py", "--device", "cpu", "--threads", "1", "--out", str(tmp_path))
    assert "every part in its --quick form" in out
    parts = [line.split("|")[1].strip() for line in out.splitlines()
             if re.match(r"\| (lesson2|time|bf16|oom) \|", line)]
    assert parts[0] == "lesson2" and parts[-2:] == ["bf16", "oom"] and parts.count("time") == len(ARMS), parts
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| failed |" not in table
    assert re.search(r"bf16 \+ channels_last [\d.]+ steps/s: [\d.]+x", table)
    oom = next(line for line in table.splitlines() if line.startswith("| oom |"))
    assert "found 64" in oom and "steps of fit at 64" in oom and "skipped on the CPU" in oom
    # part 2, the time-to-accuracy benchmark: every arm in its table; its minicnn arm is part 1's run
    bench = tmp_path / "time_to_accuracy"
    text = (bench / "time_to_accuracy.md").read_text()
    assert "| arm | epochs | " + " | ".join(f"seconds to {t}" for t in THRESHOLDS) in text
    rows = table_rows(text)
    column = {name: i for i, name in enumerate(rows["arm"])}  # the header row
    assert set(ARMS) <= set(rows), f"arms missing from the table: {set(ARMS) - set(rows)}"
    saved = json.loads((bench / "time_to_accuracy.json").read_text())["results"]
    for arm in ARMS:
        if arm == "fastai" and "skipped" in saved[arm]:  # not installed: its own line says how to get it
            assert 'fastai: skipped' in rows[arm][1] and 'pip install -e ".[bench]"' in text
            continue
        curve = saved[arm]["curve"]
        assert curve and all(0 < s1 < s2 for (s1, _), (s2, _) in zip(curve, curve[1:])), (arm, curve)
        assert all(0.0 <= acc <= 1.0 for _, acc in curve), (arm, curve)
        test = float(rows[arm][column["test"]])
        assert test == pytest.approx(saved[arm]["test"], abs=5e-5) and test > 0.3, (arm, test)  # 10 classes
        assert rows[arm][column["epochs"]] == str(len(curve))  # one validation point an epoch
    assert rows["plain"][column["epochs"]] == "2"  # --quick: 2 epochs
    lesson2 = json.loads((tmp_path / "lesson2" / "results.json").read_text())
    assert [list(p) for p in saved["minicnn"]["curve"]] == lesson2["valid_curve"]
