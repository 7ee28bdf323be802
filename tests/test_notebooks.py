"""Every lesson runs as a notebook: converted from its percent-format script by jupytext and
executed cell by cell in a fresh kernel through nbclient, with --quick's settings (the options
go in after the lesson's parameters cell, as lessons/notebooks.py does). A cell's error fails
the test, and a failed self-check is such an error. Each lesson runs once, half of them with 1
thread and half with 2 (the same seed gives other numbers with another thread count, and the
self-checks' floors hold for both)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "lessons"))
import notebooks  # noqa: E402
from conftest import needs_data  # noqa: E402

LESSONS = notebooks.lessons()


def outputs(nb, kind):
    """The outputs of every code cell: the text of its streams, or its displayed images."""
    cells = [c for c in nb.cells if c.cell_type == "code"]
    if kind == "text":
        return "".join(o.get("text", "") for c in cells for o in c.outputs if o.output_type == "stream")
    return [o for c in cells for o in c.outputs if "image/png" in o.get("data", {})]


def test_every_lesson_script_is_a_notebook_or_a_helper_of_one():
    """lessons/lesson*.py: a lesson (a parameters cell, so it runs as a notebook) or imported by one."""
    scripts = sorted(p.stem for p in (ROOT / "lessons").glob("lesson*.py"))
    texts = "\n".join((ROOT / "lessons" / f"{name}.py").read_text() for name in LESSONS)
    helpers = [name for name in scripts if name not in LESSONS]
    assert all(f"import {name}" in texts or f"from {name} import" in texts for name in helpers), (
        helpers, LESSONS)
    for name in LESSONS:
        docstring = (ROOT / "lessons" / f"{name}.py").read_text().split('"""')[1]
        assert f"python lessons/{name}.py" in docstring and "--quick" in docstring, name


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("lesson", LESSONS)
def test_lesson_runs_as_a_notebook_with_quick(lesson, tmp_path):
    threads = 1 + LESSONS.index(lesson) % 2
    nb = notebooks.to_notebook(ROOT / "lessons" / f"{lesson}.py",
                               ["--quick", "--out", str(tmp_path), "--threads", str(threads)])
    notebooks.execute(nb, timeout=600)  # CellExecutionError on any cell's error
    text = outputs(nb, "text")
    assert "self-check passed" in text and "SELF-CHECK FAILED" not in text
    assert f"{threads} CPU threads" in text, "the run did not use --threads"
    saved = sorted(tmp_path.glob("*.png"))  # the lesson's own (lesson2_labels' runs: in n*/)
    assert saved and len(outputs(nb, "images")) >= len(saved), (
        f"{lesson}: {len(saved)} figures saved but {len(outputs(nb, 'images'))} shown inline")


def test_a_failed_self_check_fails_the_notebook(tmp_path):
    from nbclient.exceptions import CellExecutionError

    script = tmp_path / "lesson_fails.py"
    script.write_text('"""A lesson whose self-check fails."""\nfrom common import check\n\n'
                      '# %% tags=["parameters"]\nARGV = []\n\n# %%\ncheck(False, "a degenerate result")\n'
                      'print("after the check")\n')
    nb = notebooks.to_notebook(script, [])
    with pytest.raises(CellExecutionError, match="SystemExit"):
        notebooks.execute(nb, timeout=120)
    assert "after the check" not in outputs(nb, "text")


def test_a_script_that_imported_ipykernel_still_reads_its_command_line(monkeypatch):
    """in_notebook: a running kernel's shell, not ipykernel merely imported (this test process
    has imported it to run the notebooks above); otherwise a lesson would ignore its argv."""
    import common
    import IPython
    import ipykernel  # noqa: F401
    assert not common.in_notebook()
    monkeypatch.setattr(sys, "argv", ["lesson.py", "--quick"])
    assert common.command_line(["from", "the", "notebook"]) == ["--quick"]

    class ZMQInteractiveShell:  # what IPython.get_ipython() returns inside a Jupyter kernel
        pass
    monkeypatch.setattr(IPython, "get_ipython", lambda: ZMQInteractiveShell())
    assert common.in_notebook() and common.command_line(["--quick"]) == ["--quick"]
    assert common.command_line([]) == []
