"""Lesson 2, step 2: the LR range test, and what its suggestion is worth.

The range test trains for 100 minibatches while the learning rate grows exponentially
from 1e-7 to 10, records the smoothed loss, and puts the model and the optimizer back
as they were. Its suggestion is "the highest rate at which the loss is still clearly
falling" (minicnn/lr_find.py states the rule). To see whether that is a good choice,
three short runs then start from the SAME initial weights with the suggested rate, 10x
it and 0.1x it as their peak, and each run is diagnosed (minicnn/diagnose.py). Each run
is one cosine cycle from its peak down to 0 (step 4's SGDR with a single cycle), as the
course uses the rate it found: the weights settle at the end, so the final losses compare
the peak rates, not the noise a constant high rate leaves in the last minibatches.

Run:
    python lessons/lesson2_lr_find.py            # CPU: about 3-4 minutes on 2 cores
    python lessons/lesson2_lr_find.py --quick    # a smoke run, under 30 seconds
Common options (lessons/common.py): --device, --out (default runs/lesson2_lr_find),
--seed (default 0, fixed), --threads, --batch-size (128), --limit (here 20,000 training
images by default, with 2,000 held out for validation, so that three runs fit in minutes).
Own options: --epochs (3), --num-iter (100; 40 with --quick).
Writes lr_find.png, losses_{0.1x,1x,10x}.png and report.json (the curve, every run's
history and diagnosis) to --out, and prints the table and the diagnoses.
"""
import copy
import json
import time

import torch

from common import check, check_accuracy, fashion_data, int_in, parse_args, threads_note
from minicnn.checkpoint import atomic_write
from minicnn.diagnose import diagnose
from minicnn.lr_find import lr_find
from minicnn.models import simple_resnet
from minicnn.plots import plot_losses, plot_lr_find
from minicnn.schedule import cosine_lr
from minicnn.train import fit

MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4
QUICK_FLOOR = 0.3  # the 1x run's validation accuracy 0.500-0.539 over seeds 0-2 x 1-2 threads


def make_opt(model):
    # lr is a placeholder: lr_find sweeps it and fit sets it every step
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def short_run(initial, lr, data, args, epochs):
    """Train a fresh copy of the initial weights, lr annealed to 0 -> (history, diagnosis or None)."""
    model = simple_resnet(10).to(args.device)
    model.load_state_dict(initial)  # every arm starts from the same weights
    try:
        total = epochs * len(data["train"])
        history = fit(model, data["train"], data["valid"], make_opt(model),
                      lambda step: cosine_lr(step, total_steps=total, lr_max=lr), epochs,
                      train_eval=data["train_eval"])
    except FloatingPointError as error:  # 10x may blow up; that is a result, not a crash
        print(f"  lr {lr:.3g}: diverged ({error})")
        return None, None
    return history, diagnose(history)


def check_options(args, error):
    """The defaults that depend on --quick; the types already checked each option alone."""
    if args.limit is None:  # --quick already set 1,024
        args.limit = 20_000
    args.num_iter = args.num_iter or (40 if args.quick else 100)
    args.epochs = args.epochs or (2 if args.quick else 3)


def main(argv=None):
    args = parse_args(__doc__.splitlines()[0], out="lesson2_lr_find", argv=argv, extra=lambda p: (
        p.add_argument("--epochs", type=int_in(1), default=None, help="3 (--quick: 2)"),
        p.add_argument("--num-iter", type=int_in(10), default=None, help="100 (--quick: 40)")),
        check_options=check_options, quick_batch_size=64)
    num_iter, epochs = args.num_iter, args.epochs
    data = fashion_data(args)
    print(f"Fashion-MNIST: {len(data['x_train'])} train, {len(data['x_valid'])} valid images; "
          f"{args.device} ({threads_note()})")
    started = time.perf_counter()

    # 1. The range test, on the model we are about to train.
    model = simple_resnet(10).to(args.device)
    initial = copy.deepcopy(model.state_dict())  # weights AND BatchNorm statistics
    result = lr_find(model, data["train"], make_opt(model), num_iter=num_iter)
    plot_lr_find(result, args.out / "lr_find.png")
    restored = all(torch.equal(v, model.state_dict()[k]) for k, v in initial.items())
    lr = result.suggested_lr
    print(f"\nLR range test ({len(result.lrs)} steps, {time.perf_counter() - started:.0f}s): {result.reason}")
    print(f"suggested lr: {lr:.3g}   (figure: {args.out / 'lr_find.png'})")

    # 2. Three short runs from the same weights: the suggestion, 10x it, 0.1x it.
    rows = []
    for name, factor in [("0.1x", 0.1), ("1x", 1.0), ("10x", 10.0)]:
        print(f"\n{name}: lr {lr * factor:.3g} annealed to 0 over {epochs} epochs")
        history, diagnosis = short_run(initial, lr * factor, data, args, epochs)
        if history is not None:
            plot_losses(history, args.out / f"losses_{name}.png", title=f"lr {lr * factor:.3g}: {diagnosis.verdict}")
        rows.append((name, lr * factor, history, diagnosis))

    print(f"\n{'run':5} {'peak lr':>8} {'train loss*':>11}  {'valid loss, epoch by epoch':26} {'valid acc':>9}  verdict")
    for name, run_lr, history, diagnosis in rows:
        if history is None:
            print(f"{name:5} {run_lr:8.3g}  diverged (NaN loss)")
        else:
            per_epoch = " ".join(f"{v:.3f}" for v in history.valid_loss)
            print(f"{name:5} {run_lr:8.3g} {history.train_eval_loss[-1]:11.4f}  {per_epoch:26} "
                  f"{history.valid_acc[-1]:9.4f}  {diagnosis.verdict}")
    print("* eval mode, on a sample of up to 2,000 training images\n")
    for name, _, _, diagnosis in rows:
        print(f"{name:5} {diagnosis if diagnosis is not None else 'diverged: lower the learning rate'}")
    report = dict(suggested_lr=lr, reason=result.reason, lrs=result.lrs, smoothed_losses=result.smoothed_losses,
                  runs={name: dict(peak_lr=run_lr, **(vars(history) if history else {}),
                                   diagnosis=str(diagnosis) if diagnosis else "diverged")
                        for name, run_lr, history, diagnosis in rows})
    atomic_write(args.out / "report.json", json.dumps(report, indent=1))
    print(f"\ntotal {time.perf_counter() - started:.0f}s; figures and report.json in {args.out}")

    # Self-check: the test left the model as it was and found a fall; its rate ends within a
    # point of the best of the three, and clearly above 0.1x it (too slow for the same steps).
    # 10x may blow up, or, annealed to 0 with BatchNorm, catch up by the end: the epoch-by-epoch
    # validation losses in the table show what it cost on the way.
    acc = {name: (history.valid_acc[-1] if history else 0.0) for name, _, history, _ in rows}
    check(restored, "lr_find restored the weights and BatchNorm statistics bit for bit")
    check(result.loss_fell, f"the range test found a falling loss: {result.reason}")
    check_accuracy(acc["1x"], data["y_valid"], floor=QUICK_FLOOR if args.quick else 0.8,
                   what=f"the run at the suggested lr {lr:.3g}: validation accuracy")
    if not args.quick:
        check(acc["1x"] >= max(acc.values()) - 0.01 and acc["1x"] >= acc["0.1x"] + 0.03,
              f"suggested lr {lr:.3g} within 1 point of the best run and 3 points above 0.1x: "
              + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    return result, rows


if __name__ == "__main__":
    main()
