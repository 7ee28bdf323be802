"""Seconds to 0.92, 0.93 and 0.94 validation accuracy on Fashion-MNIST: lesson 2's recipe and lesson 3's
successors against a plain PyTorch one-cycle loop and fastai's fit_one_cycle, one after the other on
the same machine.

Arms, each in a fresh process with the same threads (--threads), network, data and batch size:
  minicnn  lessons/lesson2.py --accuracy (--full with --mode full): from random weights, its LR
           range test, SGDR cycles of 1, 2, 4, ... epochs, progressive resizing, snapshots; its test
           accuracy is the prediction it chose on validation (last weights, TTA or an ensemble).
  sprint   lessons/lesson3_faster.py --sprint: the speedruns' techniques (label smoothing, BatchNorm
           biases at 10x the lr, an EMA of the weights, alternating flip, a whitened first conv) on
           the recipe's network, one cosine of 6 epochs from lr 0.2 (no restarts); test predicted
           plain or with the mirror image, whichever is better on validation.
  faster   lessons/lesson3_faster.py --accuracy: the same techniques on wider late stages
           (16, 32, 96, 192) with the recipe's SGDR, cycles of 1, 2, ... 16 epochs (31).
  plain    the loop in plain_arm below: torch.optim.SGD (momentum 0.9, Nesterov, weight decay 5e-4)
           and torch.optim.lr_scheduler.OneCycleLR stepped every batch, with its defaults (30%
           warm-up from max_lr/25, cosine down to max_lr/25e4, momentum cycled 0.95 -> 0.85 -> 0.95
           in place of SGD's 0.9); side_on augmentation on each batch; max_lr 0.2 (--max-lr).
  fastai   Learner.fit_one_cycle at lr_find().valley with fastai's defaults (Adam, wd 0.01), fed the
           same batches and augmentation; skipped with a line when fastai is not installed
           (pip install -e ".[bench]").
Shared: simple_resnet with lesson2's widths (lesson3's arms: their own) and batch size (read from
lesson2.py's settings and checked against its results.json), the 50,000/10,000 split of lessons/common.py (fashion_splits),
the 10,000 test images predicted once at the end, bf16 autocast + channels_last exactly where
lesson2 uses them (CUDA, or a CPU that computes bf16). Each arm's clock starts where its training
starts, its LR range test included (the recipe's step 7, fastai's lr_find), and runs through every
epoch's validation; loading the data and predicting the test set are outside it. The one-cycle
arms train as many epochs as the recipe's cycles add up to (--epochs; 31 for --accuracy: cycles
of 1+2+4+8+16), so all arms see the data as often. A one-cycle run peaks only as its budget ends, so its seconds to a
threshold follow --epochs: run a shorter --epochs too before calling the plain loop slow.

One round, not alternating rounds: an arm takes as long as lesson2 --accuracy, 10 minutes or more
on 2 cores, so 5 alternating rounds of the 3 arms (bench_loop.py's way) would take 2.5 hours or
more, and a slow spell of the machine lasting minutes lands on one arm either way. Instead, run
it again with the order rotated (--order) and compare: a gap between arms larger than the gap
between orders is the arms'.

Run:
  python benchmarks/bench_time_to_accuracy.py                      # 3 x lesson2 --accuracy's time
  python benchmarks/bench_time_to_accuracy.py --order plain,fastai,minicnn
  python benchmarks/bench_time_to_accuracy.py --order fastai,minicnn,plain
  python benchmarks/bench_time_to_accuracy.py --order sprint,plain --epochs 8   # the 0.93 target,
  python benchmarks/bench_time_to_accuracy.py --order plain,sprint --epochs 8   # both orders
  python benchmarks/bench_time_to_accuracy.py --order faster                    # the accuracy run
  python benchmarks/bench_time_to_accuracy.py --mode full          # lesson2 --full's settings (a GPU)
  python benchmarks/bench_time_to_accuracy.py --quick              # CI: seconds, numbers not comparable
Writes OUT/time_to_accuracy.md (the table), OUT/time_to_accuracy.json (every arm's curve), each
arm's log, lesson2's report.md and results.json as OUT/minicnn_*, lesson3's results.json as
OUT/sprint_results.json and OUT/faster_results.json.
"""
import argparse
import ast
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
LESSON2 = ROOT / "lessons" / "lesson2.py"
LESSON3 = ROOT / "lessons" / "lesson3_faster.py"
LESSON3_RUNS = {"sprint": "--sprint", "faster": "--accuracy"}  # the arms that are lesson3_faster runs
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "lessons"))
from minicnn.augment import side_on  # noqa: E402
from minicnn.atomic import atomic_write  # noqa: E402
from minicnn.data import Batches  # noqa: E402
from minicnn.lr_find import lr_find  # noqa: E402
from minicnn.models import simple_resnet  # noqa: E402
from minicnn.train import accuracy  # noqa: E402
import minicnn.speed as speed  # noqa: E402
from common import device, fashion_splits, float_above, int_in, out_folder, seconds_to  # noqa: E402 (lessons/)
from lesson2_settings import MODES  # noqa: E402

ARMS = ("minicnn", "sprint", "faster", "plain", "fastai")
THRESHOLDS = (0.92, 0.93, 0.94)
QUICK_TRAIN = 2000  # --quick: stratified slices of 2,000 / 200 / 200 images
# lesson2 --accuracy's range test picked 0.2 for simple_resnet at batch 128 (docs/recipe.md, step 7),
# inside the 0.1-0.4 usual for SGD with Nesterov on a ResNet at this batch; --max-lr find measures it
MAX_LR = 0.2
WEIGHT_DECAY, MOMENTUM = 5e-4, 0.9
FASTAI_SKIPPED = 'fastai: skipped ({}); install it with pip install -e ".[bench]"'


def shared_settings(args):
    """What every arm shares: lesson2's network and batch in this mode, and the way to run a step
    (speed.ways: fp32, channels_last, bf16 + channels_last) that a few timed steps found fastest,
    or the one lesson2's --minicnn-results run found, or the one --precision/--channels-last force."""
    mode = "quick" if args.quick else args.mode
    row = MODES[mode]  # lessons/lesson2_settings.py: lesson2's settings, one row per mode
    candidates, trial = speed.ways(args.device, args.precision, args.channels_last), {}
    if args.minicnn_results:  # the way lesson2 measured and took there
        way = ast.literal_eval(json.loads(Path(args.minicnn_results).read_text())["settings"]["WAY"])
        candidates = speed.WAYS
    elif len(candidates) == 1:
        way = next(iter(candidates))
    else:
        with torch.random.fork_rng():  # a network for the trial only: no random number used
            net = simple_resnet(10, 1, row["widths"]).to(args.device)
        train = load_data(args)["train"]
        batches = Batches(*train, row["batch_size"], shuffle=True, device=args.device)
        way, _, trial = speed.fastest(net, batches, candidates)
    return dict(mode=mode, widths=list(row["widths"]), batch_size=row["batch_size"], way=way,
                **candidates[way], trial=trial, recipe_epochs=2 ** row["cycles"] - 1)  # SGDR: 1, 2, 4..


def load_data(args):
    """-> dict(train, valid, test: (x uint8 (N, 1, 28, 28), y)): lesson2 --accuracy's split, or
    --quick's stratified 2,000 / 200 / 200 images (lessons/common.py's split)."""
    train, valid, test, _ = fashion_splits(args.seed, QUICK_TRAIN if args.quick else None)
    return dict(train=train, valid=valid, test=test)


def probabilities(model, x, s, device, *, flip=False):
    """Softmax probabilities (N, 10) of uint8 images x, in eval mode, 512 at a time (as lesson2)."""
    model.eval()
    out = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                         enabled=s["mixed_precision"]):
        for i in range(0, len(x), 512):
            xb = x[i:i + 512].to(device).float().div_(255)  # (B, 1, 28, 28) in [0, 1]
            xb = xb.flip(-1) if flip else xb
            if s["channels_last"]:
                xb = xb.contiguous(memory_format=torch.channels_last)
            out.append(torch.softmax(model(xb).float(), dim=1).cpu())
    return torch.cat(out)


def test_accuracies(model, data, s, device):
    """Test accuracy predicted once: plain, and with flip TTA (the mean of x and its mirror's probabilities)."""
    x, y = data["test"]
    plain = probabilities(model, x, s, device)
    return accuracy(plain, y), accuracy((plain + probabilities(model, x, s, device, flip=True)) / 2, y)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- the arms ----------------------------------------------------------------------------------------

def plain_arm(data, s, args, device):
    """What a 2019-style PyTorch script writes: SGD + OneCycleLR, one visible loop."""
    torch.manual_seed(args.seed)
    model = simple_resnet(10, 1, tuple(s["widths"])).to(device)
    if s["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    x_train, y_train = data["train"]
    batch_size, epochs = s["batch_size"], args.epochs
    steps_per_epoch = len(x_train) // batch_size  # the last short batch dropped, as lesson2 does
    opt = torch.optim.SGD(model.parameters(), lr=MAX_LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
    augment = side_on(generator=torch.Generator().manual_seed(args.seed))
    order_generator = torch.Generator().manual_seed(args.seed)

    def batch(index):  # as minicnn's Batches: uint8 on the CPU, x / 255 on the device
        xb = x_train[index].to(device, non_blocking=True).float().div_(255)  # (B, 1, 28, 28)
        return xb, y_train[index].to(device, non_blocking=True)

    synchronize(device)
    started = time.perf_counter()  # the clock: from here to the last epoch's validation
    max_lr, why = args.max_lr, "--max-lr"
    if max_lr == "find":  # minicnn's range test, as lesson2 runs it: 100 steps, 1e-7 to 10
        steps = 100 if not args.quick else 50  # lesson2's LR_FIND_STEPS
        found = lr_find(model, [batch(torch.randperm(len(x_train), generator=order_generator)[:batch_size])
                                for _ in range(steps)], opt, num_iter=steps, end_lr=10.0)
        max_lr, why = (found.suggested_lr, found.reason) if found.loss_fell else (MAX_LR, f"no fall: {found.reason}")
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(max_lr), total_steps=epochs * steps_per_epoch)
    curve = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=order_generator)
        for i in range(steps_per_epoch):
            x, y = batch(order[i * batch_size:(i + 1) * batch_size])
            x = augment(x)
            if s["channels_last"]:
                x = x.contiguous(memory_format=torch.channels_last)
            # forward, backward, step, then the schedule's next LR and momentum
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=s["mixed_precision"]):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            schedule.step()
        # evaluate: the validation set after every epoch, on the clock
        valid_acc = accuracy(probabilities(model, data["valid"][0], s, device), data["valid"][1])
        synchronize(device)
        curve.append((time.perf_counter() - started, valid_acc))
        print(f"epoch {epoch}: loss {loss.item():.4f}, validation accuracy {valid_acc:.4f}, {curve[-1][0]:.0f}s",
              flush=True)
    test, test_flip = test_accuracies(model, data, s, device)
    return dict(curve=curve, test=test, test_flip=test_flip, epochs=epochs, how="last weights",
                lr=f"OneCycleLR max_lr {float(max_lr):.3g} ({why})")


def fastai_arm(data, s, args, device):
    """fastai's best-practice one-liner on the same batches: lr_find(), then fit_one_cycle at its valley."""
    import fastai.callback.schedule  # noqa: F401  (puts lr_find and fit_one_cycle on Learner)
    from fastai.callback.core import Callback
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy as fastai_accuracy

    class Curve(Callback):
        """(seconds since the clock started, validation accuracy) after each epoch, from fastai's Recorder."""
        order = 60  # after the Recorder (50) has computed the epoch's metrics

        def __init__(self, started):
            self.started, self.curve = started, []

        def after_epoch(self):
            synchronize(device)
            self.curve.append((time.perf_counter() - self.started, float(self.learn.recorder.values[-1][-1])))
            print(f"epoch {self.epoch}: validation accuracy {self.curve[-1][1]:.4f}, {self.curve[-1][0]:.0f}s",
                  flush=True)

    class Way(Callback):
        """bf16 autocast and channels_last where the other arms use them. fastai 2.8's MixedPrecision
        (to_bf16) enters autocast("cuda") only, so on the CPU it would do nothing; this is it for either device."""
        order = 10  # where MixedPrecision sits
        layout = torch.channels_last if s["channels_last"] else torch.contiguous_format

        def before_fit(self):
            self.learn.model.to(memory_format=self.layout)

        def before_batch(self):
            self.learn.xb = tuple(x.contiguous(memory_format=self.layout) for x in self.xb)
            self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=s["mixed_precision"])
            self.autocast.__enter__()

        def after_pred(self):
            self.learn.pred = self.pred.float()

        def after_loss(self):
            self.autocast.__exit__(None, None, None)

    class Augmented:
        """The training batches through side_on: what fastai's DataLoader gets (len, iter)."""
        def __init__(self, batches, augment):
            self.batches, self.augment = batches, augment

        def __len__(self):
            return len(self.batches)

        def __iter__(self):
            return ((self.augment(x), y) for x, y in self.batches)

    torch.manual_seed(args.seed)
    model = simple_resnet(10, 1, tuple(s["widths"])).to(device)
    g = torch.Generator().manual_seed(args.seed)
    batches = Batches(*data["train"], s["batch_size"], shuffle=True, drop_last=True, generator=g, device=device)
    train = Augmented(batches, side_on(generator=torch.Generator().manual_seed(args.seed)))
    valid = Batches(*data["valid"], 512, shuffle=False, device=device)
    folder = tempfile.mkdtemp()  # lr_find saves the weights there and loads them back
    synchronize(device)
    started = time.perf_counter()
    curve = Curve(started)
    learn = Learner(DataLoaders(train, valid), model, loss_func=CrossEntropyLossFlat(), metrics=fastai_accuracy,
                    path=folder, cbs=[Way()])
    with learn.no_bar():  # its progress bar redraws itself into the log hundreds of times an epoch
        lr = learn.lr_find(num_it=100 if not args.quick else 50, show_plot=False).valley
        learn.fit_one_cycle(args.epochs, lr, cbs=[curve])
    shutil.rmtree(folder, ignore_errors=True)
    test, test_flip = test_accuracies(learn.model, data, s, device)
    return dict(curve=curve.curve, test=test, test_flip=test_flip, epochs=args.epochs, how="last weights",
                lr=f"fit_one_cycle lr_max {lr:.3g} (lr_find valley), Adam, wd 0.01")


def run_in_process(args):
    """One arm (--run-arm), in this fresh process: its result written as JSON to --result."""
    torch.set_num_threads(args.threads)
    s = json.loads(args.settings)
    if args.run_arm == "fastai":
        try:
            import fastai  # noqa: F401
        except ImportError as error:  # said before any work
            Path(args.result).write_text(json.dumps(dict(skipped=FASTAI_SKIPPED.format(error))))
            return
    data = load_data(args)
    arm = {"plain": plain_arm, "fastai": fastai_arm}[args.run_arm]
    result = arm(data, s, args, torch.device(args.device))
    Path(args.result).write_text(json.dumps(result))


def run_arm(name, args, s):
    """Run one arm in a fresh process -> its result dict (curve, test, ...), or skipped / failed."""
    log = args.out / f"{name}.log"
    if name == "fastai" and importlib.util.find_spec("fastai") is None:  # not installed: no process to start
        return dict(skipped=FASTAI_SKIPPED.format("No module named 'fastai'"))
    if name == "minicnn" and args.minicnn_results:  # already run (gpu_check.py runs lesson2 --full first)
        return minicnn_result(json.loads(Path(args.minicnn_results).read_text()), s,
                              source=f"from {args.minicnn_results}")
    with tempfile.TemporaryDirectory() as folder:
        if name == "minicnn" or name in LESSON3_RUNS:  # a lesson, from scratch on 10 classes, in the shared way
            if name in LESSON3_RUNS:  # the same run on a CPU or a GPU
                mode = [LESSON3_RUNS[name]] + (["--quick"] if s["mode"] == "quick" else [])
            else:
                mode = ["--accuracy", "--quick"] if s["mode"] == "quick" else [f"--{s['mode']}"]
            command = [sys.executable, str(LESSON2 if name == "minicnn" else LESSON3), *mode, "--out", folder,
                       "--threads", str(args.threads), "--device", args.device, "--seed", str(args.seed),
                       "--precision", "bf16" if s["mixed_precision"] else "fp32",
                       "--channels-last", "on" if s["channels_last"] else "off"]
        else:
            command = [sys.executable, __file__, "--run-arm", name, "--result", str(Path(folder) / "result.json"),
                       "--settings", json.dumps(s)] + args.passed_on
        with open(log, "w") as file:
            try:
                done = subprocess.run(command, stdout=file, stderr=subprocess.STDOUT, cwd=ROOT,
                                      timeout=args.arm_timeout, env={**os.environ, "MPLBACKEND": "Agg"})
            except subprocess.TimeoutExpired:
                return dict(failed=f"stopped after --arm-timeout {args.arm_timeout}s (log: {log})")
        if done.returncode != 0:
            return dict(failed=f"exit status {done.returncode}; the end of {log}:\n" + log.read_text()[-2000:])
        if name in LESSON3_RUNS:
            shutil.copy(Path(folder) / "results.json", args.out / f"{name}_results.json")
            return lesson3_result(json.loads((Path(folder) / "results.json").read_text()), s)
        if name != "minicnn":
            return json.loads((Path(folder) / "result.json").read_text())
        for kept in ("results.json", "report.md"):
            shutil.copy(Path(folder) / kept, args.out / f"minicnn_{kept}")
        return minicnn_result(json.loads((Path(folder) / "results.json").read_text()), s, source="lessons/lesson2.py")


def minicnn_result(results, s, *, source):
    """lesson2's results.json -> the arm's result; its network and batch must be the ones the others used."""
    settings = results["settings"]
    for key, name in (("widths", "WIDTHS"), ("batch_size", "BATCH_SIZE"), ("way", "WAY")):
        used = settings.get(name)
        want = repr(tuple(s[key])) if key == "widths" else repr(s[key])
        if used != want:
            raise SystemExit(f"lesson2 ran with {name} = {used}, the other arms with {want}: not the same "
                             "setting; check lessons/lesson2_settings.py")
    return dict(curve=[tuple(point) for point in results["valid_curve"]], test=results["test"], test_flip=None,
                epochs=len(results["valid_curve"]), how=f"{results['chosen']} (chosen on validation)",
                lr=f"SGDR, its range test ({source})")


def lesson3_result(results, s):
    """lesson3_faster --accuracy's or --sprint's results.json -> the arm's result; its way must be the
    others'."""
    if results["way"] != s["way"]:
        raise SystemExit(f"lesson3_faster trained in {results['way']}, the other arms in {s['way']}")
    (r,) = results["results"].values()  # --accuracy and --sprint: one arm
    return dict(curve=[tuple(point) for point in r["curve"]], test=r["test"], test_flip=None,
                epochs=len(r["curve"]), how=f"{r['predicted']} (chosen on validation)",
                lr=f"{r['schedule']}, simple_resnet{tuple(r['widths'])}, {', '.join(r['features'])}")


# ---- the table ---------------------------------------------------------------------------------------

def trial_note(s):
    """The speed trial's step times, as the table's note says them ("" when none ran)."""
    return (" (seconds a step: " + ", ".join(f"{k} {v:.3f}" for k, v in s["trial"].items()) + ")"
            if s["trial"] else "")


def table(results, s, args):
    """The markdown table: seconds to each threshold, ratios to the plain loop, test accuracies."""
    def number(value, form):
        return "not reached" if value is None else format(value, form)
    plain = results.get("plain", {})
    head = (["arm", "epochs"] + [f"seconds to {t}" for t in THRESHOLDS] + [f"x plain ({t})" for t in THRESHOLDS]
            + ["best valid", "training seconds", "test", "test, flip TTA", "test predicted as", "LR"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        if "curve" not in r:
            lines.append(f"| {name} | {r.get('skipped') or 'failed: ' + r['failed'].splitlines()[0]} |")
            continue
        reached = [seconds_to(r["curve"], t) for t in THRESHOLDS]
        base = [seconds_to(plain["curve"], t) if "curve" in plain else None for t in THRESHOLDS]
        ratios = ["—" if a is None or b is None else f"{a / b:.2f}x" for a, b in zip(reached, base)]
        lines.append("| " + " | ".join(
            [name, str(r["epochs"])] + [number(v, ".0f") for v in reached] + ratios
            + [f"{max(a for _, a in r['curve']):.4f}", f"{r['curve'][-1][0]:.0f}", f"{r['test']:.4f}",
               "—" if r["test_flip"] is None else f"{r['test_flip']:.4f}", r["how"], r["lr"]]) + " |")
    note = (f"simple_resnet{tuple(s['widths'])} (lesson3's arms: see their LR column), batch {s['batch_size']}, "
            f"{args.threads} thread(s) on {args.device}, "
            f"training in {s['way']}{trial_note(s)}, lesson2 mode {s['mode']}; order "
            f"{','.join(args.order)}; one-cycle arms {args.epochs} epochs.")
    if args.quick:
        note += (" --quick: a smoke run on slices (lessons 2 and 3 with --quick), "
                 "so the arms' numbers are not comparable.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def results_file(text):
    """--minicnn-results: a lesson2 results.json that exists, with the validation curve the table needs."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{path}: no such file; give the results.json a lesson2 run wrote "
                                         "in its --out")
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise argparse.ArgumentTypeError(f"{path} cannot be read as JSON ({error}); "
                                         "give a lesson2 results.json") from None
    missing = [key for key in ("valid_curve", "test", "chosen", "settings")
               if not isinstance(results, dict) or key not in results]
    if missing:
        raise argparse.ArgumentTypeError(f"{path} is not a lesson2 results.json (no {', '.join(missing)})")
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke run: slices of the data, 2 epochs, seconds")
    parser.add_argument("--mode", choices=("accuracy", "full"), default="accuracy",
                        help="lesson2's mode, whose network and batch every arm uses (default accuracy)")
    parser.add_argument("--order", default=",".join(ARMS), help="the arms to run, in this order (default "
                        f"{','.join(ARMS)}); rotate it between runs")
    parser.add_argument("--epochs", type=int_in(1), default=None, help="epochs of the one-cycle arms (default: the "
                        "recipe's, 31 with --mode accuracy: the same passes over the data; --quick 2)")
    parser.add_argument("--max-lr", default=str(MAX_LR), help=f"the plain loop's OneCycleLR max_lr (default {MAX_LR}: "
                        "what lesson2's range test picked), or 'find' (minicnn.lr_find, on the clock)")
    parser.add_argument("--threads", type=int_in(1), default=os.cpu_count(),
                        help="torch threads of every arm (default: all)")
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int_in(0), default=0)
    parser.add_argument("--out", type=out_folder, default=ROOT / "runs" / "bench_time_to_accuracy")
    parser.add_argument("--arm-timeout", type=float_above(0), default=3600, help="seconds before an arm is stopped")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="every arm's arithmetic: auto (the default) times a few steps of each "
                             "and takes the faster; bf16 is tried only where the device computes it")
    parser.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                        help="every arm's memory layout: auto (the default) times a few steps of each")
    parser.add_argument("--minicnn-results", type=results_file, default=None,
                        help="a lesson2 results.json of this machine to use as "
                        "the minicnn arm instead of running lesson2 (gpu_check.py: its --full run)")
    parser.add_argument("--run-arm", choices=ARMS[1:], help=argparse.SUPPRESS)  # internal: one arm, in its process
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.order = args.order.split(",")
    if not args.order or any(a not in ARMS for a in args.order) or len(set(args.order)) != len(args.order):
        parser.error(f"--order {','.join(args.order)}: give each of {', '.join(ARMS)} at most once, comma-separated")
    if args.max_lr != "find":
        try:
            args.max_lr = float(args.max_lr)
        except ValueError:
            parser.error(f"--max-lr {args.max_lr!r}: give a number > 0 or 'find'")
        if not (math.isfinite(args.max_lr) and args.max_lr > 0):
            parser.error(f"--max-lr {args.max_lr}: must be a finite number > 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.run_arm:
        return run_in_process(args)
    s = shared_settings(args)
    args.epochs = args.epochs or (2 if args.quick else s["recipe_epochs"])
    args.passed_on = ["--epochs", str(args.epochs), "--max-lr", str(args.max_lr), "--threads", str(args.threads),
                      "--device", args.device, "--seed", str(args.seed)] + (["--quick"] if args.quick else [])
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"time to accuracy: arms {', '.join(args.order)}; simple_resnet{tuple(s['widths'])}, batch "
          f"{s['batch_size']}, {args.threads} thread(s), {args.device}, {s['way']}{trial_note(s)}",
          flush=True)
    results = {}
    for name in args.order:
        started = time.perf_counter()
        results[name] = run_arm(name, args, s)
        r = results[name]
        said = r.get("skipped") or (f"failed: {r['failed']}" if "failed" in r else
                                    f"best validation {max(a for _, a in r['curve']):.4f}, test {r['test']:.4f}")
        print(f"[{name}] {said} ({time.perf_counter() - started:.0f}s in all)", flush=True)
    text = table(results, s, args)
    atomic_write(args.out / "time_to_accuracy.md", text)
    atomic_write(args.out / "time_to_accuracy.json", json.dumps(dict(settings=s, order=args.order, results=results),
                                                                 indent=1))
    print(text + f"written to {args.out / 'time_to_accuracy.md'}")
    if any("failed" in r for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
