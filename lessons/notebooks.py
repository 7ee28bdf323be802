"""Every lesson as an executed Jupyter notebook: code, its output and its figures on one page.

A lesson is a jupytext "percent" script: `# %%` opens a code cell, `# %% [markdown]` a text
cell, and the cell tagged "parameters" holds ARGV, the options a notebook runs with (as a
script, a lesson reads its command line instead). This script converts each lesson, puts a
cell with the options given here after its parameters cell (papermill's convention), runs
every cell in a fresh kernel, and writes the notebook, outputs included.

Run:
    python lessons/notebooks.py                          # every lesson, defaults, into notebooks/
    python lessons/notebooks.py --quick                  # every smoke run, into notebooks/quick/
    python lessons/notebooks.py lesson2 -- --labelled 1000   # one lesson, with its own options
`make notebooks` runs the first. A lesson opens as a notebook directly in VS Code or in Jupyter
with jupytext installed (it is in the dev extra).
"""

import argparse
import os
import sys
import time
from pathlib import Path

LESSONS_DIR = Path(__file__).resolve().parent
ROOT = LESSONS_DIR.parent
PARAMETERS = "parameters"  # the tag of the cell that holds ARGV


def lessons():
    """The lesson scripts: lessons/lesson*.py with a parameters cell (helpers have none)."""
    return sorted(
        p.stem
        for p in LESSONS_DIR.glob("lesson*.py")
        if f'# %% tags=["{PARAMETERS}"]' in p.read_text(encoding="utf-8")
    )


def to_notebook(path, argv):
    """A lesson script (a path) as a notebook whose run takes `argv` as its options."""
    import jupytext
    import nbformat

    nb = jupytext.read(path)
    tagged = [i for i, c in enumerate(nb.cells) if PARAMETERS in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        raise ValueError(f"{path} needs one cell tagged {PARAMETERS!r}, has {len(tagged)}")
    given = nbformat.v4.new_code_cell(f"ARGV = {list(argv)!r}  # given to lessons/notebooks.py")
    given.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(tagged[0] + 1, given)
    return nb


def execute(nb, *, timeout=1800, cwd=LESSONS_DIR):
    """Run every cell in a fresh Python kernel started in `cwd`; a cell's error raises
    nbclient's CellExecutionError (a failed self-check exits its cell: an error too)."""
    from nbclient import NotebookClient

    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault(
        "OMP_WAIT_POLICY", "PASSIVE"
    )  # threads sleep, not spin, on a busy machine
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    return client.execute()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run the lessons as notebooks, outputs included.")
    parser.add_argument("names", nargs="*", help="lessons to run (default: all), e.g. lesson2")
    parser.add_argument("--quick", action="store_true", help="each lesson's --quick smoke run")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder (notebooks/; with --quick, notebooks/quick/)")
    argv = sys.argv[1:] if argv is None else argv
    ours, lesson_argv = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    args = parser.parse_args(ours)
    args.out = args.out or ROOT / "notebooks" / ("quick" if args.quick else "")
    unknown = sorted(set(args.names) - set(lessons()))
    if unknown:
        parser.error(f"no such lesson: {', '.join(unknown)}; choose from {', '.join(lessons())}")
    import nbformat
    from nbclient.exceptions import CellExecutionError

    sys.path.insert(0, str(ROOT))
    from minicnn.atomic import atomic_write

    failed = []
    for name in args.names or lessons():
        nb = to_notebook(
            LESSONS_DIR / f"{name}.py", (["--quick"] if args.quick else []) + lesson_argv
        )
        started = time.perf_counter()
        try:
            execute(nb)
        except CellExecutionError as error:
            failed.append(name)
            print(f"{name}: a cell failed: {str(error).splitlines()[0] if str(error) else error}")
        atomic_write(args.out / f"{name}.ipynb", nbformat.writes(nb))
        print(f"{name}: {time.perf_counter() - started:.0f} s -> {args.out / (name + '.ipynb')}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
