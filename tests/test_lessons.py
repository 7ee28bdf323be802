"""Every lesson runs end to end with --quick on a small slice of Fashion-MNIST, so CI catches a
broken lesson. Each writes its figures into a temporary folder and ends with its self-check,
whose failure makes the script exit non-zero."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minicnn.data import fashion_mnist_folders

ROOT = Path(__file__).resolve().parent.parent
LESSONS = sorted(p.name for p in (ROOT / "lessons").glob("lesson*.py") if p.name != "lesson2_steps.py")
HAVE_DATA = any((Path(f) / "train-images-idx3-ubyte.gz").is_file() or (Path(f) / "train-images-idx3-ubyte").is_file()
                for f in fashion_mnist_folders())


def test_every_lesson_is_listed():
    assert {"lesson1_baseline.py", "lesson2.py"} <= set(LESSONS)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST not installed (make test installs it)")
@pytest.mark.parametrize("lesson", LESSONS)
def test_lesson_runs_quick(lesson, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "lessons" / lesson), "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT,
                            # PASSIVE: OpenMP threads sleep instead of spinning when the cores are busy
                            # (spinning made 2-thread runs 10-20x slower on a shared machine)
                            env={**os.environ, "MPLBACKEND": "Agg", "OMP_WAIT_POLICY": "PASSIVE"})
    assert result.returncode == 0, f"{lesson} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "self-check passed" in result.stdout
    assert list(tmp_path.glob("*.png")), f"{lesson} wrote no figure"


def _lesson2_settings(*argv):
    import argparse
    sys.path.insert(0, str(ROOT / "lessons"))
    try:
        import lesson2_steps
        from common import add_common_args
    finally:
        sys.path.remove(str(ROOT / "lessons"))
    parser = add_common_args(argparse.ArgumentParser(), out="lesson2", auto_batch=True)
    lesson2_steps.add_lesson2_args(parser)
    return lesson2_steps.settings_for(parser.parse_args(list(argv)))


def test_lesson2_settings_pretrained_body_keeps_bn_statistics_and_ratio_10():
    cpu = _lesson2_settings()
    assert (cpu["arch"], cpu["lr_ratio"], cpu["bn_freeze"]) == ("simple_resnet", 3, False)  # starts random
    for argv in (["--full"], ["--arch", "efficientnet_lite0"], ["--quick", "--arch", "resnet18"]):
        settings = _lesson2_settings(*argv)
        assert (settings["lr_ratio"], settings["bn_freeze"]) == (10, True), argv
    assert _lesson2_settings("--full", "--lr-ratio", "3")["lr_ratio"] == 3  # the command line wins


def test_lesson2_settings_refuse_shrinking_images():
    with pytest.raises(SystemExit, match="small to big"):
        _lesson2_settings("--size", "20", "--small-size", "28")
