"""The GPU path in one prepared run: lesson 2's --full, the time-to-accuracy benchmark, bf16 autocast
+ channels_last against fp32, and find_batch_size through a real CUDA out-of-memory error; one table.

On CUDA, in this order, each part in a process of its own under its own time limit (--limits):
  1. lesson2  lessons/lesson2.py --full: its test accuracy (target: >= 0.955) and seconds
  2. time     benchmarks/bench_time_to_accuracy.py --mode full, whose minicnn arm is part 1's run
              (the lesson is not trained twice), and lesson3_faster --accuracy (the faster arm): seconds
              to 0.92, 0.93 and 0.94 of each arm, ratios
  3. bf16     training steps per second of simple_resnet at lesson2 --full's widths and batch through
              minicnn.train.fit, fp32 (cuDNN's default TF32) against bf16 autocast + channels_last
  4. OOM      a ballast tensor takes all the GPU's memory but --headroom-gib, so that the doubling
              batch sizes of find_batch_size meet a real torch.OutOfMemoryError at a size a step
              computes in milliseconds (on the whole 139 GiB of an H200 it would come at tens of
              thousands of images); then fit trains 20 steps at the size found, in the same process,
              the ballast still there, and the memory allocated before and after the search is compared
Without CUDA, or with --quick, every part runs its --quick form and the table says so. On the CPU
the real out-of-memory error is skipped (a CPU process that runs out of memory meets the kernel's
OOM killer or swap, not an error to catch; tests/test_batch_size.py fakes them): find_batch_size
runs bounded by its limit instead, then trains at that size.

Run:  python benchmarks/gpu_check.py                 # a CUDA machine: at most the --limits (10 minutes)
      python benchmarks/gpu_check.py --quick         # any machine: seconds (what the tests run)
      [--limits 240,240,45,60] [--threads N] [--out runs/gpu_check]
Writes OUT/gpu_check.md (the table), OUT/lesson2/ (part 1's report) and OUT/time_to_accuracy/.
"""
import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "lessons"))
from bench_time_to_accuracy import THRESHOLDS, seconds_to, synchronize  # noqa: E402
from lesson2_settings import MODES  # noqa: E402  (lessons/, on the path as bench_time_to_accuracy puts it)
from minicnn.batch_size import find_batch_size  # noqa: E402
from minicnn.atomic import atomic_write  # noqa: E402
from minicnn.data import Batches  # noqa: E402
from minicnn.models import simple_resnet  # noqa: E402
from minicnn.train import fit  # noqa: E402
import minicnn.speed as speed  # noqa: E402
from common import device, float_above, int_in, out_folder  # noqa: E402  (lessons/common.py: the argument checks)

PARTS = ("lesson2", "time", "bf16", "oom")
LIMITS = (240, 240, 45, 60)  # seconds per part on CUDA: 10 minutes in all at most
FULL_TARGET = 0.955  # --full on one GPU: above ResNet18's 0.949 in the Fashion-MNIST benchmark table
TRAIN_STEPS = 20  # part 4: steps of fit at the batch size found


def network(args):
    """lesson2's widths and batch in the mode this check runs (--full on CUDA, else --quick)."""
    mode = "quick" if args.quick else "full"
    return tuple(MODES[mode]["widths"]), MODES[mode]["batch_size"]


# ---- parts 3 and 4, each run in its own process (--part) ---------------------------------------------

def bf16_part(args):
    """Steps per second through fit: fp32 against bf16 autocast + channels_last, alternating rounds."""
    device, (widths, batch) = torch.device(args.device), network(args)
    steps, rounds = (3, 1) if args.quick else (40, 3)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (steps * batch, 1, 28, 28), dtype=torch.uint8, generator=g)  # (N, 1, 28, 28)
    batches = list(Batches(x, torch.randint(0, 10, (len(x),), generator=g), batch, shuffle=False, device=device))
    torch.manual_seed(0)
    initial = simple_resnet(10, 1, widths).to(device)
    speeds = {"fp32": [], "bf16": []}
    for r in range(rounds + 1):  # round 0 warms up (first calls, cuDNN's choices) and is dropped
        for name in ("fp32", "bf16") if r % 2 else ("bf16", "fp32"):
            model = copy.deepcopy(initial)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            synchronize(device)
            started = time.perf_counter()
            fit(model, batches, None, opt, lambda step: 0.05, 1, mixed_precision=name == "bf16",
                channels_last=name == "bf16", verbose=False)
            synchronize(device)
            if r:
                speeds[name].append(steps / (time.perf_counter() - started))
    fp32, bf16 = (statistics.median(speeds[name]) for name in ("fp32", "bf16"))
    tf32 = " (TF32 convolutions)" if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else ""
    return dict(result=f"simple_resnet{widths}, batch {batch}: fp32{tf32} {fp32:.1f} steps/s, bf16 + channels_last "
                       f"{bf16:.1f} steps/s: {bf16 / fp32:.2f}x ({rounds} round(s) of {steps} steps, medians)",
                ratio=bf16 / fp32)


def oom_part(args):
    """find_batch_size through a real out-of-memory error (CUDA), then fit at the size found."""
    device, (widths, _) = torch.device(args.device), network(args)
    bf16 = speed.computes_bf16(device)  # on CUDA: as lesson2's speed trial finds there
    torch.manual_seed(0)
    layout = torch.channels_last if bf16 else torch.preserve_format
    model = simple_resnet(10, 1, widths).to(device, memory_format=layout)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    tried, fitted = [], []

    def try_step(b):  # 3 training steps at batch size b, keeping nothing
        tried.append(b)
        x = torch.rand(b, 1, 28, 28, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (b,), device=device)
        for _ in range(3):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        fitted.append(b)

    ballast, note = None, ""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        ballast = torch.empty(max(0, free - int(args.headroom_gib * 2**30)), dtype=torch.uint8, device=device)
        note = f"ballast {ballast.numel() / 2**30:.1f} of {total / 2**30:.0f} GiB; "
        limit, start = 50_000, 16  # lesson2's training set bounds the search
    else:
        limit, start = 64, 2
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    found = find_batch_size(try_step, start=start, limit=limit, model=model, optimizer=opt, verbose=True)
    leak = (torch.cuda.memory_allocated(device) - before) if device.type == "cuda" else 0
    oom_at = sorted(set(tried) - set(fitted))
    # then train on at the size found, in this process, the ballast still held
    g = torch.Generator().manual_seed(0)
    steps = 3 if args.quick else TRAIN_STEPS
    x = torch.randint(0, 256, (steps * found, 1, 28, 28), dtype=torch.uint8, generator=g)
    train = Batches(x, torch.randint(0, 10, (len(x),), generator=g), found, shuffle=True, generator=g, device=device)
    history = fit(model, train, None, opt, lambda step: 0.01, 1, mixed_precision=bf16, channels_last=bf16,
                  verbose=False)
    del ballast
    result = (f"{note}tried {tried}; out of memory at {oom_at or 'none'}; found {found}; memory allocated after the "
              f"search {leak / 2**20:+.0f} MiB against before; then {len(history.batch_loss)} steps of fit at {found}, "
              f"last loss {history.batch_loss[-1]:.3f}")
    if device.type == "cuda" and not oom_at:
        return dict(failed=result + ": no out-of-memory error happened, so recovery was not tested; lower "
                    "--headroom-gib")
    if leak > 2**20:
        return dict(failed=result + ": the search left memory allocated")
    return dict(result=result + ("" if device.type == "cuda" else "; the real out-of-memory error skipped on the CPU "
                                 "(a CPU runs into the OOM killer or swap, not a catchable error)"), found=found)


# ---- the parts in order, each in its own process under its limit -----------------------------------

def run(command, limit, log):
    """command in a subprocess, stdout and stderr to log -> None, or why it failed."""
    with open(log, "w") as file:
        try:
            done = subprocess.run(command, stdout=file, stderr=subprocess.STDOUT, cwd=ROOT, timeout=limit,
                                  env={**os.environ, "MPLBACKEND": "Agg"})
        except subprocess.TimeoutExpired:
            return f"stopped at its limit of {limit}s (log: {log})"
    if done.returncode != 0:
        return f"exit status {done.returncode}; the end of {log}:\n" + Path(log).read_text()[-1500:]
    return None


def run_parts(args):
    """-> rows (part, what, result, seconds, status) of the table."""
    quick = ["--quick"] if args.quick else []
    common = ["--threads", str(args.threads), "--device", args.device]
    rows, limits = [], dict(zip(PARTS, args.limits))

    def timed(part, what, command, read):
        """Run one part under its limit; read() -> its rows [(what, result, status)] once it succeeded."""
        started = time.perf_counter()
        failed = run(command, limits[part], args.out / f"{part}.log")
        found = [(what, failed.splitlines()[0], "failed")] if failed else read()
        seconds = time.perf_counter() - started
        for name, result, status in found:
            rows.append((part, name, result, seconds, status))
            print(f"[{part}] {name}: {result} ({seconds:.0f}s, {status})", flush=True)
        if failed:
            print(failed, flush=True)

    # 1. lesson2 --full (--quick without CUDA)
    lesson_out = args.out / "lesson2"
    results_path = lesson_out / "results.json"
    results_path.unlink(missing_ok=True)  # never read a stale run

    def lesson2_rows():
        r = json.loads(results_path.read_text())
        target = "" if args.quick else f"; target >= {FULL_TARGET}: {'met' if r['test'] >= FULL_TARGET else 'not met'}"
        return [(what, f"test {r['test']:.4f} ({r['chosen']}), {len(r['valid_curve'])} epochs, {r['seconds']:.0f}s "
                       f"in all{target}", "ok")]
    what = "lessons/lesson2.py " + ("--quick" if args.quick else "--full")
    timed("lesson2", what, [sys.executable, str(ROOT / "lessons" / "lesson2.py"), "--quick" if args.quick else "--full",
                            "--out", str(lesson_out), "--overwrite"] + common, lesson2_rows)  # its folder

    # 2. the time-to-accuracy benchmark, its minicnn arm read from part 1's results
    bench_out = args.out / "time_to_accuracy"
    reuse = ["--minicnn-results", str(results_path)] if results_path.is_file() else ["--order", "plain,fastai"]

    def bench_rows():
        saved = json.loads((bench_out / "time_to_accuracy.json").read_text())["results"]
        plain = saved.get("plain", {}).get("curve")
        found = []
        for name, r in saved.items():
            if "curve" not in r:
                found.append((f"time to accuracy: {name}", r.get("skipped") or r["failed"].splitlines()[0],
                              "skipped" if "skipped" in r else "failed"))
                continue
            reached = []
            for t in THRESHOLDS:
                seconds, base = seconds_to(r["curve"], t), seconds_to(plain, t) if plain else None
                reached.append(f"{t}: " + ("not reached" if seconds is None else f"{seconds:.0f}s")
                               + (f" ({seconds / base:.2f}x plain)" if seconds is not None and base else ""))
            found.append((f"time to accuracy: {name}", ", ".join(reached) + f"; test {r['test']:.4f}", "ok"))
        return found
    timed("time", "benchmarks/bench_time_to_accuracy.py",
          [sys.executable, str(ROOT / "benchmarks" / "bench_time_to_accuracy.py"), "--mode", "full", "--out",
           str(bench_out), "--arm-timeout", str(max(1, limits["time"] - 15))] + reuse + quick + common, bench_rows)

    # 3 and 4, each in its own process
    for part, what in (("bf16", "bf16 autocast + channels_last against fp32"),
                       ("oom", "find_batch_size through a real out-of-memory error, then fit")):
        with tempfile.TemporaryDirectory() as folder:
            result = Path(folder) / "result.json"

            def part_rows():
                r = json.loads(result.read_text())
                return [(what, r.get("result") or r["failed"], "failed" if "failed" in r else "ok")]
            timed(part, what, [sys.executable, __file__, "--part", part, "--result", str(result),
                               "--headroom-gib", str(args.headroom_gib)] + quick + common, part_rows)
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every part's quick form (the default without CUDA)")
    parser.add_argument("--limits", default=",".join(map(str, LIMITS)),
                        help=f"seconds for parts {', '.join(PARTS)}, comma-separated (default {LIMITS})")
    parser.add_argument("--threads", type=int_in(1), default=os.cpu_count())
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--headroom-gib", type=float_above(0), default=2.0, help="GPU memory part 4 leaves free (GiB)")
    parser.add_argument("--out", type=out_folder, default=ROOT / "runs" / "gpu_check")
    parser.add_argument("--part", choices=PARTS[2:], help=argparse.SUPPRESS)  # internal: one part, in its process
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.limits = [float(x) for x in args.limits.split(",")]
    except ValueError:
        parser.error(f"--limits {args.limits!r}: give {len(PARTS)} numbers of seconds, comma-separated")
    if len(args.limits) != len(PARTS) or not all(math.isfinite(x) and x > 0 for x in args.limits):
        parser.error(f"--limits: give {len(PARTS)} finite numbers of seconds > 0, for {', '.join(PARTS)}")
    args.cpu_only = not args.device.startswith("cuda")
    args.quick = args.quick or args.cpu_only  # the full forms are for a GPU
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.part:
        result = {"bf16": bf16_part, "oom": oom_part}[args.part](args)
        Path(args.result).write_text(json.dumps(result))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    where = (torch.cuda.get_device_name(0) if not args.cpu_only else f"the CPU, {args.threads} thread(s)")
    print(f"gpu_check on {where}: " + ("every part in its --quick form (no GPU)" if args.cpu_only else
                                       "--quick forms" if args.quick else "full forms"), flush=True)
    rows = run_parts(args)
    lines = ["| part | what | result | seconds | status |", "|---|---|---|---|---|"]
    lines += [f"| {part} | {what} | {result} | {seconds:.0f} | {status} |"
              for part, what, result, seconds, status in rows]
    lines += ["", f"On {where}; " + ("quick forms: smoke checks, not measurements." if args.quick else
                                     f"limits {args.limits} s.")]
    text = "\n".join(lines) + "\n"
    atomic_write(args.out / "gpu_check.md", text)
    print(text + f"written to {args.out / 'gpu_check.md'}")
    if any(status == "failed" for *_, status in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
