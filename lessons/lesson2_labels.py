"""Lesson 2, measured: a pretrained body pays most when labels are few.

Run:
    python lessons/lesson2_labels.py            # CPU: 250, 1,000, 4,000 and 16,000 labels, minutes
    python lessons/lesson2_labels.py --full     # 100 to 25,000 labels, 9 points
    python lessons/lesson2_labels.py --quick    # 2 tiny points, seconds
    python lessons/notebooks.py lesson2_labels  # this file as an executed notebook
Writes labels.png and labels.md (the table) to --out (default runs/lesson2_labels), each point's
own run of lessons/lesson2.py to --out/n<labels> (its report.md, results.json and figures), and
the body, pretrained once, to --out/cache. --help lists the options.
"""
import argparse
import json
import subprocess
import sys
import time

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common import ROOT, check, command_line, device, int_in, out_folder, show, threads_note
from minicnn.atomic import atomic_write
from minicnn.plots import save_png

# %% [markdown]
# # Lesson 2, measured: where does a pretrained body stop paying?
#
# The fast.ai recipe starts from a network pretrained on ImageNet and fine-tunes it, because
# the features it learned from a great many labelled photos (edges, textures, parts) serve a
# new task too, so a few thousand labels of our own go a long way. The flip side: with
# enough labels, a network trained from scratch learns those features itself, and the
# pretrained start stops paying.
#
# This lesson measures where. For each number of labelled images, lessons/lesson2.py runs the
# whole recipe on a body pretrained on 5 Fashion-MNIST classes (the stand-in for ImageNet)
# to learn the other 5, then trains a network from scratch on the same images for the same
# seconds. We collect both test accuracies and draw them against the number of labels.

# %% tags=["parameters"]
# The options of a notebook run (a script takes its command line instead), e.g. ["--quick"].
ARGV = []

# %% [markdown]
# ## Settings
#
# By default 4 points, from 250 to 16,000 labelled images; `--full` 9 points, from 100 to
# 25,000; `--quick` 2 tiny points, each a `lesson2.py --quick` run of seconds (a smoke run).
# Each point is a run of lesson2.py in its own process, so the options here are those it
# passes on (`--seed`, `--threads`, `--device`), plus where to write. The body is pretrained
# at the first point and read from the cache at the others.

# %%
POINTS = (250, 1000, 4000, 16_000)  # labelled images of each point, by default
FULL_POINTS = (100, 250, 500, 1000, 2000, 4000, 8000, 16_000, 25_000)  # --full
QUICK_POINTS = (100, 200)  # --quick: runs of lesson2.py --quick
LESSON = ROOT / "lessons" / "lesson2.py"  # the lesson each point runs

# common.parse_args does not fit here: this lesson trains nothing itself, and --limit and
# --batch-size would not reach lesson2.py, so it takes only the options it passes on.
parser = argparse.ArgumentParser(
    description="Lesson 2, measured: for each number of labelled images, lessons/lesson2.py "
                "runs the recipe on a pretrained body and trains a network from scratch on the "
                "same images for the same seconds, and the two test accuracies are drawn "
                "against the number of labels.")
parser.add_argument("--quick", action="store_true",
                    help=f"{len(QUICK_POINTS)} tiny points, {' and '.join(map(str, QUICK_POINTS))} "
                         "labels, each a lesson2.py --quick run (seconds)")
parser.add_argument("--full", action="store_true",
                    help=f"{len(FULL_POINTS)} points, {FULL_POINTS[0]} to {FULL_POINTS[-1]:,} "
                         f"labels (without --quick or --full: {len(POINTS)} points, "
                         f"{', '.join(f'{n:,}' for n in POINTS)})")
parser.add_argument("--out", type=out_folder, default=ROOT / "runs" / "lesson2_labels",
                    help="folder for labels.png, labels.md, each point's run (n<labels>/) and "
                         "the cached body (cache/) (runs/lesson2_labels in the checkout)")
parser.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0,
                    help="seed of every lesson2.py run (0)")
parser.add_argument("--threads", type=int_in(1), default=None,
                    help="CPU threads for torch in each lesson2.py run (default: all)")
parser.add_argument("--device", type=device, default=None,
                    help="cpu, cuda or cuda:N for each lesson2.py run (default: lesson2.py's, "
                         "cuda when there is a GPU, else cpu)")
args = parser.parse_args(command_line(ARGV))
if args.quick and args.full:
    parser.error("--quick and --full: choose one")
labelled = QUICK_POINTS if args.quick else FULL_POINTS if args.full else POINTS
if args.threads:
    torch.set_num_threads(args.threads)  # here only so that threads_note says what each run gets
print(f"lesson2.py for {', '.join(map(str, labelled))} labelled images ({threads_note()} each)")

# %% [markdown]
# ## One run of lesson2.py per point
#
# Each run trains two networks on the same labelled images and predicts the same test
# images once, at the end: the recipe's (the pretrained body, steps 1-8) and one from scratch,
# given the seconds the recipe took. Same images, same seconds, so the gap between the two
# accuracies is what the pretrained body bought. Each line below is one point: both test
# accuracies and their seconds. lesson2.py checks each run's test set and accuracy itself, and
# the run's report.md in --out/n<labels> tells the whole story of that point.

# %%
results = {}
for n in labelled:
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
    print(f"{n:6d} labels: the recipe {r['test']:.4f} in {r['scratch']['recipe_seconds']:.0f}s, "
          f"from scratch {r['scratch']['test']:.4f} in {r['scratch']['seconds']:.0f}s "
          f"({time.perf_counter() - started:.0f}s with predictions)", flush=True)

# %% [markdown]
# ## Test accuracy against the number of labels
#
# The solid line is the recipe on the pretrained body, the dashed one the network from
# scratch; the x axis is logarithmic, each point holding several times the labels of the
# one before, and the seconds the recipe took are written above its points. Look at the gap
# on the left, where labels are few, and follow it to the right: where the curves cross,
# the pretrained body stops paying. The table says the same in numbers, the gain in
# percentage points. The quick run's tiny points are a smoke test, too short to tell which
# arm wins; the default run's figure is the one to read.

# %%
fig = Figure(figsize=(6, 4), dpi=100, layout="tight")
FigureCanvasAgg(fig)
ax = fig.add_subplot()
recipe = [results[n]["test"] for n in labelled]
scratch = [results[n]["scratch"]["test"] for n in labelled]
ax.plot(labelled, recipe, "o-", label="pretrained body + the recipe (steps 1-8)")
ax.plot(labelled, scratch, "s--", label="from scratch, the same images and seconds")
for n, acc in zip(labelled, recipe):
    ax.annotate(f"{results[n]['scratch']['recipe_seconds']:.0f}s", (n, acc),
                textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
ax.set_xscale("log")
ax.set_xlabel("labelled training images of the 5 new classes (log scale)")
ax.set_ylabel("test accuracy")
ax.set_title("Fashion-MNIST, 5 new classes: where does a pretrained body pay?", fontsize=9)
ax.legend(fontsize=8)
save_png(fig, args.out / "labels.png")
show(fig)
lines = ["| labelled images | the recipe: test | seconds | from scratch: test | seconds | gain |",
         "|---|---|---|---|---|---|"]
lines += [f"| {n:,} | {results[n]['test']:.4f} | {results[n]['scratch']['recipe_seconds']:.0f} | "
          f"{results[n]['scratch']['test']:.4f} | {results[n]['scratch']['seconds']:.0f} | "
          f"{100 * (results[n]['test'] - results[n]['scratch']['test']):+.1f} points |"
          for n in labelled]
atomic_write(args.out / "labels.md", "\n".join(lines) + "\n\n![labels](labels.png)\n")
print("\n".join(lines) + f"\nfigure: {args.out / 'labels.png'}")

# %% [markdown]
# ## Self-check
#
# Every point must have run both arms, the recipe and the network from scratch, on the
# number of labels asked for (each lesson2.py run already checked its own test set and
# accuracy). The default and full runs also ask that, from scratch, the most labels beat the
# fewest by 2 points: a curve that does not rise with the labels would mean the runs did not
# learn from them. The quick run checks the mechanics only.

# %%
asked = {n: results[n]["settings"]["N_LABELLED"] for n in labelled}
check(all(asked[n] == repr(n) and results[n]["scratch"] for n in labelled),
      f"every point ran the recipe and the from-scratch arm on the labels asked for: {asked}")
if not args.quick:
    low, high = scratch[0], scratch[-1]
    check(high > low + 0.02,
          f"from scratch, {labelled[-1]:,} labels beat {labelled[0]:,}: "
          f"{high:.4f} > {low:.4f} + 0.02")
