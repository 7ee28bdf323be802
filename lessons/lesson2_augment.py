"""Lesson 2, augmentation: random flips, rotations, zooms and lighting against overfitting; test-time
augmentation (TTA); progressive resizing (small images first, then full size).

Three runs of a small ResNet, all from the SAME initial weights and the same batch order:
  plain       full-size images, no augmentation;
  augmented   full-size images through side_on (flip, rotate 10 deg, zoom 1.1, lighting 0.05);
  progressive augmented too, first at 14x14 then at 28x28, for the same pixel budget as
              `augmented` (an epoch at 14x14 counts a quarter of one at 28x28).
It prints the eval-mode training loss against the validation loss of each (augmentation
narrows the gap), accuracy without and with TTA on the augmented model, and progressive vs
full size. At this CPU budget augmentation halves the gap mostly by raising the training
loss: the augmented model is still learning when the schedule ends, and here it costs a
little accuracy. The model has adaptive pooling, so the same network takes 14x14 and 28x28
images: progressive resizing is just train.fit called again with batches of bigger images.

Run:
    python lessons/lesson2_augment.py            # CPU: about 3 minutes on 2 cores
    python lessons/lesson2_augment.py --quick    # a smoke run, under 30 seconds
Common options (lessons/common.py): --device, --out (default runs/lesson2_augment), --seed
(default 0, fixed), --threads, --batch-size (64 here, 16 with --quick), --limit. Own options: --n-train (3,000
training images: few enough for the plain run to overfit within minutes), --n-valid (2,000
held-out images), --epochs (14, the full-size budget), --lr (0.05), --small (14),
--small-epochs (4: 4 epochs at 14x14 cost 1 at 28x28, so the progressive run gets 13 more).
Writes augmented.png, side_on_vs_top_down.png, tta_views.png, losses_{plain,augmented,progressive}.png.
"""
import copy
import time

import torch

from common import (check, check_accuracy, check_size, fashion_data, float_above, int_in, parse_args, split_sizes,
                    threads_note)
from minicnn.augment import lighting, random_affine, resize, side_on, top_down
from minicnn.data import Batches, stratified_subset
from minicnn.models import simple_resnet
from minicnn.plots import plot_augmented, plot_losses
from minicnn.schedule import cosine_lr
from minicnn.train import accuracy, fit, join_histories, predict
from minicnn.tta import predict_tta

MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4
QUICK_FLOOR = 0.25  # the three runs' validation accuracy 0.382-0.549 over seeds 0-2 x 1-2 threads


def draw_grids(image, seed, out):
    """One image (1, C, H, W) under 8 draws of each augmentation, and side_on vs top_down."""
    x = image.expand(8, -1, -1, -1)                         # (8, C, H, W): one image, 8 draws
    g = torch.Generator().manual_seed(seed)
    rows = {"original": image,
            "flip p=0.5": random_affine(x, generator=g, flip=0.5, p_affine=0),
            "rotate +-10": random_affine(x, generator=g, flip=0, max_rotate=10, max_zoom=1, p_affine=1),
            "zoom 1-1.1": random_affine(x, generator=g, flip=0, max_rotate=0, max_zoom=1.1, p_affine=1),
            "lighting 0.2": lighting(x, generator=g, max_brightness=0.2, max_contrast=0.2, p=1),
            "side_on": side_on(generator=g)(x)}
    plot_augmented(rows, out / "augmented.png", title="one image, 8 random draws of each augmentation")
    plot_augmented({"side_on": side_on(generator=g)(x), "top_down": top_down(generator=g)(x)},
                   out / "side_on_vs_top_down.png", title="side_on: flips left-right only; top_down: 8 symmetries")


def draw_tta_views(model, x_valid, y_valid, p_plain, p_tta, classes, args):
    """The plain view and 4 side_on views of a validation image TTA got right and the plain view
    got wrong (else the first image), titled with each view's probability of the true class."""
    fixed = ((p_plain.argmax(1) != y_valid) & (p_tta.argmax(1) == y_valid)).nonzero()
    i = int(fixed[0, 0]) if len(fixed) else 0
    image = x_valid[i][None].float().to(args.device) / 255                    # (1, 1, 28, 28)
    views = torch.cat([image, side_on(generator=torch.Generator().manual_seed(args.seed))(image.expand(4, -1, -1, -1))])
    probs = predict(model, [(views, None)])[:, y_valid[i]]                 # (5,) p(true class) per view
    plot_augmented({"TTA views": views.cpu()}, args.out / "tta_views.png",
                   title=f"{classes[y_valid[i]]}: p(true class) per view " + " ".join(f"{p:.2f}" for p in probs)
                   + f" -> mean {probs.mean():.2f} (plain view first)")


def run(initial, stages, lr, device, augment):
    """Train a copy of `initial` through stages [(train, valid, train_eval, epochs), ...] under one
    cosine schedule across all of them -> (model, History of the stages joined, seconds)."""
    model = simple_resnet(10).to(device)
    model.load_state_dict(initial)                          # every arm starts from the same weights
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    total = sum(len(train) * epochs for train, _, _, epochs in stages)
    histories, done = [], 0
    for train, valid, train_eval, epochs in stages:
        def lr_at(step, offset=done):                       # the cosine runs on from stage to stage
            return cosine_lr(offset + step, total_steps=total, lr_max=lr)
        # Same model, same optimizer; only the size of the images in the batches changes.
        if len(stages) > 1:
            print(f"  {train.x.shape[-2]}x{train.x.shape[-1]} images, {epochs} epochs")
        histories.append(fit(model, train, valid, opt, lr_at, epochs, augment=augment, train_eval=train_eval))
        done += len(train) * epochs
    joined = join_histories(histories)
    return model, joined, sum(joined.seconds)


def check_options(args, error):
    """Defaults that depend on --quick (cut to what --limit leaves); sizes within the splits; a pixel
    budget that adds up."""
    sizes = split_sizes(args)
    args.n_train = args.n_train or min(512 if args.quick else 3000, sizes["train"])
    args.n_valid = args.n_valid or min(2000, sizes["valid"])
    args.epochs = args.epochs or (2 if args.quick else 14)
    for name, split in [("train", "training"), ("valid", "validation")]:
        check_size(error, f"--n-{name}", getattr(args, f"n_{name}"), high=sizes[name],
                   what=f"the {split} split holds {sizes[name]:,} images; a bigger --limit gives more")
    # Pixel budget: an epoch at small x small costs (small / 28)^2 of a full-size epoch.
    big_epochs = args.epochs - args.small_epochs * (args.small / 28) ** 2
    if big_epochs < 1 or not float(big_epochs).is_integer():
        error(f"argument --small-epochs: {args.small_epochs} epochs at {args.small}px leave {big_epochs:g} full-size "
              f"epochs of the {args.epochs}-epoch budget (--epochs); choose values that leave a whole number >= 1 "
              "(4 epochs at 14px cost 1 at 28px)")
    args.big_epochs = int(big_epochs)


def main(argv=None):
    args = parse_args(__doc__.splitlines()[0], out="lesson2_augment", argv=argv, extra=lambda p: (
        p.add_argument("--n-train", type=int_in(1), default=None, help="3,000 (--quick: 512)"),
        p.add_argument("--n-valid", type=int_in(1), default=None, help="2,000 (or all that --limit holds out)"),
        p.add_argument("--epochs", type=int_in(1), default=None, help="14 (--quick: 2)"),
        p.add_argument("--lr", type=float_above(0), default=0.05),
        p.add_argument("--small", type=int_in(8, 27), default=14),
        p.add_argument("--small-epochs", type=int_in(1), default=4)), check_options=check_options,
        batch_size=64, quick_batch_size=16)  # --quick: 32 steps an epoch on 512 images
    epochs, big_epochs = args.epochs, args.big_epochs
    data = fashion_data(args)
    # every class in its share (uint8 (N, 1, 28, 28)); a slice x[:n] need not hold every class
    x_train, y_train = stratified_subset(data["x_train"], data["y_train"], args.n_train, seed=args.seed)
    x_valid, y_valid = stratified_subset(data["x_valid"], data["y_valid"], args.n_valid, seed=args.seed)
    print(f"Fashion-MNIST: {len(x_train)} train, {len(x_valid)} valid images; {args.device} ({threads_note()})")
    started = time.perf_counter()

    # 1. What the augmentations do to one image (an ankle boot: a flip is easy to see).
    boot = x_train[(y_train == 9).nonzero()[0, 0]][None].float() / 255          # (1, 1, 28, 28)
    draw_grids(boot, args.seed, args.out)

    # 2. The data at both sizes. resize() turns the whole uint8 set into 14x14 once.
    def sized(size):
        xt, xv = (x_train, x_valid) if size == 28 else (resize(x_train, size), resize(x_valid, size))
        return (Batches(xt, y_train, args.batch_size, shuffle=True, device=args.device,
                        generator=torch.Generator().manual_seed(args.seed)),   # same order in every run
                Batches(xv, y_valid, 512, shuffle=False, device=args.device),
                Batches(xt[:1000], y_train[:1000], 500, shuffle=False, device=args.device))
    full, small = sized(28), sized(args.small)

    # 3. Three runs from the same initial weights.
    initial = copy.deepcopy(simple_resnet(10).state_dict())
    aug = side_on(generator=torch.Generator().manual_seed(args.seed))
    print(f"\nplain: {epochs} epochs at 28x28, no augmentation")
    plain, h_plain, t_plain = run(initial, [(*full, epochs)], args.lr, args.device, None)
    print(f"\naugmented: {epochs} epochs at 28x28 through side_on")
    augmented, h_aug, t_aug = run(initial, [(*full, epochs)], args.lr, args.device, aug)
    print(f"\nprogressive: {args.small_epochs} epochs at {args.small}x{args.small}, then {big_epochs} at 28x28, side_on")
    progressive, h_prog, t_prog = run(initial, [(*small, args.small_epochs), (*full, big_epochs)],
                                      args.lr, args.device, aug)
    for name, history in [("plain", h_plain), ("augmented", h_aug), ("progressive", h_prog)]:
        plot_losses(history, args.out / f"losses_{name}.png", title=f"{name}: valid accuracy {history.valid_acc[-1]:.4f}")

    # 4. TTA on the augmented model: the plain view + 4 side_on views, probabilities averaged.
    valid = full[1]
    p_plain = predict(augmented, valid)
    p_tta = predict_tta(augmented, valid, augment="side_on", generator=torch.Generator().manual_seed(args.seed))
    p_beta = predict_tta(augmented, valid, augment="side_on", generator=torch.Generator().manual_seed(args.seed),
                         beta=0.25)
    # Flip only: the plain view and its mirror image, an exact view (no resampling blur).
    p_flip = predict_tta(augmented, valid, augment=lambda x: x.flip(-1), n_aug=1)
    acc_plain, acc_tta, acc_beta = accuracy(p_plain, y_valid), accuracy(p_tta, y_valid), accuracy(p_beta, y_valid)
    acc_flip = accuracy(p_flip, y_valid)
    draw_tta_views(augmented, x_valid, y_valid, p_plain, p_tta, data["classes"], args)

    gap = {name: h.valid_loss[-1] - h.train_eval_loss[-1] for name, h in [("plain", h_plain), ("augmented", h_aug)]}
    print(f"\n{'run':12} {'train loss*':>11} {'valid loss':>10} {'gap':>7} {'valid acc':>9} {'train time':>10}")
    for name, h, seconds in [("plain", h_plain, t_plain), ("augmented", h_aug, t_aug), ("progressive", h_prog, t_prog)]:
        print(f"{name:12} {h.train_eval_loss[-1]:11.4f} {h.valid_loss[-1]:10.4f} "
              f"{h.valid_loss[-1] - h.train_eval_loss[-1]:7.4f} {h.valid_acc[-1]:9.4f} {seconds:9.0f}s")
    print("* eval mode, no augmentation, on 1,000 training images; gap = valid loss - train loss")
    print(f"\naugmentation: gap {gap['plain']:.4f} -> {gap['augmented']:.4f}; "
          f"accuracy {h_plain.valid_acc[-1]:.4f} -> {h_aug.valid_acc[-1]:.4f}")
    print(f"TTA on the augmented model: {acc_plain:.4f} -> {acc_tta:.4f} (gain {acc_tta - acc_plain:+.4f}); "
          f"fastai 2's beta=0.25 mix: {acc_beta:.4f} ({acc_beta - acc_plain:+.4f}); "
          f"flip only: {acc_flip:.4f} ({acc_flip - acc_plain:+.4f})")
    print(f"progressive resizing vs full size, same pixel budget: accuracy {h_prog.valid_acc[-1]:.4f} vs "
          f"{h_aug.valid_acc[-1]:.4f}, training time {t_prog:.0f}s vs {t_aug:.0f}s")
    print(f"\ntotal {time.perf_counter() - started:.0f}s; figures in {args.out}")

    # Self-check. Always: TTA returns one probability row per image, in order, summing to 1.
    check(p_tta.shape == p_plain.shape and torch.allclose(p_tta.sum(1), torch.ones(len(p_tta)), atol=1e-5),
          f"TTA gives {len(p_tta)} probability rows summing to 1")
    for name, history in [("plain", h_plain), ("augmented", h_aug), ("progressive", h_prog)]:
        check_accuracy(history.valid_acc[-1], y_valid, floor=QUICK_FLOOR if args.quick else 0.8,
                       what=f"{name}: validation accuracy")
    if not args.quick:
        check(gap["augmented"] < gap["plain"],
              f"augmentation narrows the train/valid gap: {gap['plain']:.4f} -> {gap['augmented']:.4f}")
        check(acc_tta >= acc_plain - 0.003, f"TTA does not hurt: {acc_plain:.4f} -> {acc_tta:.4f}")
        check(h_prog.valid_acc[-1] >= h_aug.valid_acc[-1] - 0.01,
              f"progressive resizing within 1 point of full size: {h_prog.valid_acc[-1]:.4f} vs {h_aug.valid_acc[-1]:.4f}")
    return dict(gap=gap, acc_plain=acc_plain, acc_tta=acc_tta, acc_beta=acc_beta, acc_flip=acc_flip,
                acc_progressive=h_prog.valid_acc[-1], acc_full=h_aug.valid_acc[-1], seconds=(t_plain, t_aug, t_prog))


if __name__ == "__main__":
    main()
