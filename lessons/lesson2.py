"""Lesson 2 end to end: the fast.ai recipe's 8 steps to a world-class image classifier.

Fashion-MNIST (50,000 training images, 10,000 held out of them for validation; the
10,000 test images are used once, at the very end, and choose nothing), or your own
images with --data PATH (train/<class>/*, valid/<class>/*: valid/ then plays the
test set's part and a tenth of train/ is held out for validation).

Run:
    python lessons/lesson2.py              # the CPU default (what `make lesson` runs)
    python lessons/lesson2.py --full       # the GPU setting: bigger images, more cycles
    python lessons/lesson2.py --quick      # a smoke run on a small slice
    python lessons/lesson2.py --data ~/dogscats --arch resnet34 --size 224
Everything lands in --out (default runs/lesson2): report.md and the figures it links.
"""
import time

import torch

from common import add_common_args, check, setup, threads_note
import lesson2_steps as steps
from minicnn.augment import side_on, top_down
from minicnn.diagnose import diagnose
from minicnn.freeze import bn_freeze, differential_lrs, freeze, param_groups, unfreeze
from minicnn.lr_find import lr_find
from minicnn.optim import SGD
from minicnn.plots import plot_augmented, plot_lr_find
from minicnn.precompute import body_and_head, precompute_features
from minicnn.schedule import cycle_end_steps, sgdr_lr
from minicnn.snapshot import Snapshots
from minicnn.train import evaluate, fit


def main(argv=None):
    import argparse
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), out="lesson2", auto_batch=True)
    steps.add_lesson2_args(parser)
    args = parser.parse_args(argv)
    settings = steps.settings_for(args)
    setup(args)
    report = steps.Report(args.out, settings)
    data = steps.load_data(args, settings)
    x_train, y_train = data["train"]
    print(f"{data['name']}: {len(x_train)} train, {len(data['valid'][0])} valid, {len(data['test'][0])} test "
          f"images; {settings['arch']} at {settings['small_size']}px then {settings['size']}px on {args.device} "
          f"({threads_note()})")
    model = steps.build_model(settings, data).to(args.device)
    aug_generator = torch.Generator().manual_seed(args.seed)
    small = steps.image_batches(data, settings["small_size"], settings, args)  # train/valid/test/train_eval
    hyper = dict(momentum=0.9, weight_decay=settings["weight_decay"], decoupled_weight_decay=True)

    # --- Step 1: choose the augmentation; train the head on precomputed activations -------------
    started = time.perf_counter()
    preset = top_down if settings["preset"] == "top_down" else side_on
    augment = preset(generator=aug_generator)
    sample = next(iter(small["valid"]))[0][:8].cpu()  # (8, C, H, W) in [0, 1]
    draw = preset(generator=torch.Generator().manual_seed(1))
    plot_augmented({"original": sample, **{f"{settings['preset']} #{i}": draw(sample) for i in (1, 2, 3)}},
                   args.out / "augmentation.png", title=f"{settings['preset']} augmentation")
    freeze(model, train_bn=False)  # the body is a fixed function: what precomputing assumes
    body, head = body_and_head(model)
    features = {split: precompute_features(body, steps.at_size(data[split][0], settings["small_size"]),
                                           batch_size=256, cache=args.out / "cache", arch=settings["arch"],
                                           device=args.device)
                for split in ("train", "valid")}
    head_train, head_valid = steps.feature_batches(features, data, settings, args)
    report.step(1, f"{settings['preset']} augmentation; body activations precomputed "
                   f"({tuple(features['train'].shape[1:])} per image)", started, None)

    # --- Step 2: LR range test on the head (over the precomputed activations) ---------------------
    started = time.perf_counter()
    head_opt = SGD(head.parameters(), lr=1e-2, **hyper)
    found = lr_find(head, head_train, head_opt, num_iter=settings["lr_find_iter"], end_lr=10.0)
    plot_lr_find(found, args.out / "lr_find_head.png")
    lr = steps.chosen_lr(found, fallback=1e-2)
    report.step(2, f"LR range test on the head: lr = {lr:.2g} ({found.reason})", started, None)

    # --- Step 3: frozen body: train the last layer group for 1-2 epochs (on the activations) ---------
    started = time.perf_counter()
    head_steps = settings["head_epochs"] * len(head_train)
    history = fit(head, head_train, head_valid, head_opt,
                  lambda s: sgdr_lr(s, steps_per_cycle=head_steps, lr_max=lr), settings["head_epochs"])
    report.step(3, f"head trained {settings['head_epochs']} epoch(s) on the activations, SGDR one cycle",
                started, evaluate(model, small["valid"])[1], history)  # the head now sits in the model

    # --- Step 4: precompute off: the last group with augmentation, SGDR cycle_len=1 -----------------
    started = time.perf_counter()
    opt = SGD(param_groups(model, lr, **hyper), lr=lr, **hyper)  # one group per layer group
    per_epoch = len(small["train"])
    history = fit(model, small["train"], small["valid"], opt,
                  lambda s: sgdr_lr(s, steps_per_cycle=per_epoch, lr_max=lr), settings["frozen_cycles"],
                  augment=augment, train_eval=small["train_eval"])
    report.step(4, f"frozen body, augmented images, {settings['frozen_cycles']} SGDR cycles of 1 epoch at "
                   f"lr {lr:.2g}", started, history.valid_acc[-1], history)

    # --- Step 5: unfreeze all layer groups -------------------------------------------------------
    unfreeze(model)
    if settings["bn_freeze"]:  # a pretrained body keeps its BatchNorm statistics (see settings_for)
        bn_freeze(model)
    n_groups = len(model.layer_groups)

    # --- Step 6: differential learning rates: each group `ratio` times lower than the next --------
    lrs = differential_lrs(lr, n_groups, ratio=settings["lr_ratio"])
    opt = SGD(param_groups(model, lrs, **hyper), lr=lr, **hyper)
    report.step(5, "unfrozen: every layer group trains" + (" (body BatchNorm on its running statistics)"
                   if settings["bn_freeze"] else ""), time.perf_counter(), None)
    report.step(6, "differential LRs " + ", ".join(f"{x:.2g}" for x in lrs), time.perf_counter(), None)

    # --- Step 7: LR range test again, the groups keeping their ratios ------------------------------
    started = time.perf_counter()
    found_all = lr_find(model, small["train"], opt, num_iter=settings["lr_find_iter"], end_lr=10.0)
    plot_lr_find(found_all, args.out / "lr_find_unfrozen.png")
    lr = steps.chosen_lr(found_all, fallback=lr / 2, floor=lr / 100)  # far below the head's LR: noise
    lrs = differential_lrs(lr, n_groups, ratio=settings["lr_ratio"])
    report.step(7, f"LR range test on the whole network: last group lr = {lr:.2g} ({found_all.reason})",
                started, None)

    # --- Step 8: the whole network, SGDR with cycle_mult=2, a snapshot at each cycle's end -----------
    # Progressive resizing: every cycle but the last on small images, the last one on full-size ones.
    # Stop early when a cycle ends with a worse validation loss than the cycle before (overfitting).
    snapshots = Snapshots()
    n_cycles, schedule = settings["cycles"], dict(steps_per_cycle=per_epoch, cycle_mult=2)
    ends = cycle_end_steps(n_cycles, **schedule)
    lr_at = lambda s: [sgdr_lr(s, **schedule, lr_max=x) for x in lrs]  # noqa: E731
    full = steps.image_batches(data, settings["size"], settings, args) if settings["size"] != settings["small_size"] else small
    histories, stopped = [], None
    for cycle in range(n_cycles):
        started = time.perf_counter()
        stage = full if cycle == n_cycles - 1 else small
        first = ends[cycle - 1] + 1 if cycle else 0  # the step after the previous cycle's last
        history = fit(model, stage["train"], stage["valid"], opt, lr_at, (ends[cycle] + 1) // per_epoch,
                      start_step=first, augment=augment, cycle_ends=ends, on_cycle_end=snapshots,
                      train_eval=stage["train_eval"])
        histories.append(history)
        size_now = settings["size"] if stage is full else settings["small_size"]
        report.step(8, f"cycle {cycle + 1}/{n_cycles}: {(ends[cycle] + 1 - first) // per_epoch} epoch(s) at "
                       f"{size_now}px, snapshot taken", started, history.valid_acc[-1], history)
        if cycle and history.valid_loss[-1] > histories[-2].valid_loss[-1]:
            stopped = f"validation loss rose at the end of cycle {cycle + 1}: stopped (overfitting)"
            break
    history = steps.join(histories)
    verdict = diagnose(history)

    # --- After the recipe: TTA, the snapshot ensemble, the test set once -----------------------------
    final = full
    results = steps.final_predictions(model, snapshots, final, augment_preset=preset, args=args,
                                      n_aug=settings["tta_n_aug"])
    steps.figures(args.out, model, history, final, data, results)
    test_acc = report.finish(results, verdict, stopped)
    expected = settings["expected_test_acc"]
    check(test_acc >= expected, f"test accuracy {test_acc:.4f} >= {expected} (report: {args.out / 'report.md'})")
    return test_acc


if __name__ == "__main__":
    main()
