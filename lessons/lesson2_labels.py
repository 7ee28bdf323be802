"""Lesson 2, the seed's note measured: a pretrained body pays most when labels are few.

For each number of labelled images, lessons/lesson2.py runs the recipe on the body pretrained
on 5 other Fashion-MNIST classes, then trains a network from scratch on the same images for
the same seconds. This lesson collects both test accuracies and draws them against the number
of labels (labels.png, with the seconds each took): where the curves cross, the pretrained
body stops paying.

Run:
    python lessons/lesson2_labels.py           # CPU: 250, 1,000, 4,000 and 16,000 labels, minutes
    python lessons/lesson2_labels.py --full    # 100 to 25,000 labels, 9 points
    python lessons/lesson2_labels.py --quick   # 2 tiny points, seconds
Each point's own report is in --out (default runs/lesson2_labels)/n<labels>/report.md; the body is
pretrained once and cached in --out/cache. Options: --seed, --threads, --device, --out.
"""
# %% Settings
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common import check, device, int_in, out_folder, threads_note
from minicnn.checkpoint import atomic_write
from minicnn.plots import save_png

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="2 tiny points (lesson2.py --quick), seconds")
parser.add_argument("--full", action="store_true", help="9 points, 100 to 25,000 labels")
parser.add_argument("--out", type=out_folder, default=Path("runs/lesson2_labels"))
parser.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0)
parser.add_argument("--threads", type=int_in(1), default=None)
parser.add_argument("--device", type=device, default=None)
args = parser.parse_args(sys.argv[1:] if __name__ == "__main__" else [])
if args.quick and args.full:
    parser.error("--quick and --full: choose one")
LABELLED = ((100, 200) if args.quick else (100, 250, 500, 1000, 2000, 4000, 8000, 16_000, 25_000) if args.full
            else (250, 1000, 4000, 16_000))
LESSON = Path(__file__).resolve().parent / "lesson2.py"
if args.threads:
    import torch
    torch.set_num_threads(args.threads)  # here only so that threads_note says what each run gets
print(f"lesson2.py for {', '.join(map(str, LABELLED))} labelled images ({threads_note()} each)")

# %% One run of lesson2.py per point, each in its own process (the pretrained body is cached)
results = {}
for n in LABELLED:
    started = time.perf_counter()
    argv = [sys.executable, str(LESSON), "--labelled", str(n), "--out", str(args.out / f"n{n}"),
            "--cache", str(args.out / "cache"), "--seed", str(args.seed)]
    argv += ["--quick"] * args.quick + (["--threads", str(args.threads)] if args.threads else [])
    argv += ["--device", args.device] if args.device else []
    run = subprocess.run(argv, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"lesson2.py --labelled {n} failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    results[n] = json.loads((args.out / f"n{n}" / "results.json").read_text())
    r = results[n]
    print(f"{n:6d} labels: the recipe {r['test']:.4f} in {r['scratch']['recipe_seconds']:.0f}s, from scratch "
          f"{r['scratch']['test']:.4f} in {r['scratch']['seconds']:.0f}s ({time.perf_counter() - started:.0f}s "
          "with predictions)", flush=True)

# %% The figure: test accuracy against the number of labelled images, both arms
fig = Figure(figsize=(6, 4), dpi=100, layout="tight")
FigureCanvasAgg(fig)
ax = fig.add_subplot()
recipe = [results[n]["test"] for n in LABELLED]
scratch = [results[n]["scratch"]["test"] for n in LABELLED]
ax.plot(LABELLED, recipe, "o-", label="pretrained body + the recipe (steps 1-8)")
ax.plot(LABELLED, scratch, "s--", label="from scratch, the same images and seconds")
for n, acc in zip(LABELLED, recipe):
    ax.annotate(f"{results[n]['scratch']['recipe_seconds']:.0f}s", (n, acc), textcoords="offset points",
                xytext=(0, 6), ha="center", fontsize=7)
ax.set_xscale("log")
ax.set_xlabel("labelled training images of the 5 new classes (log scale)")
ax.set_ylabel("test accuracy")
ax.set_title("Fashion-MNIST, 5 new classes: where does a pretrained body pay?", fontsize=9)
ax.legend(fontsize=8)
save_png(fig, args.out / "labels.png")
lines = ["| labelled images | the recipe: test | seconds | from scratch: test | seconds | gain |", "|---|---|---|---|---|---|"]
lines += [f"| {n:,} | {results[n]['test']:.4f} | {results[n]['scratch']['recipe_seconds']:.0f} | "
          f"{results[n]['scratch']['test']:.4f} | {results[n]['scratch']['seconds']:.0f} | "
          f"{100 * (results[n]['test'] - results[n]['scratch']['test']):+.1f} points |" for n in LABELLED]
atomic_write(args.out / "labels.md", "\n".join(lines) + "\n\n![labels](labels.png)\n")
print("\n".join(lines) + f"\nfigure: {args.out / 'labels.png'}")

# %% Self-check: each point ran both arms with the labels asked for (lesson2.py checked each run's
# test set and accuracy itself), and from scratch, more labels gave a higher accuracy
asked = {n: results[n]["settings"]["N_LABELLED"] for n in LABELLED}
check(all(asked[n] == repr(n) and results[n]["scratch"] for n in LABELLED),
      f"every point ran the recipe and the from-scratch arm on the labels asked for: {asked}")
if not args.quick:
    low, high = scratch[0], scratch[-1]
    check(high > low + 0.02, f"from scratch, {LABELLED[-1]:,} labels beat {LABELLED[0]:,}: {high:.4f} > {low:.4f} + 0.02")
