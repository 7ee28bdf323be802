"""Lesson 2, step 8 and after: SGDR with growing cycles, a snapshot and a checkpoint at each cycle's
end, snapshot ensembles with and without TTA, an exact resume, and the largest batch that fits.

Run:
    python lessons/lesson2_snapshots.py              # CPU: about 3-4 minutes on 2 cores
    python lessons/lesson2_snapshots.py --quick      # a smoke run, under 30 seconds
    python lessons/notebooks.py lesson2_snapshots    # this file as an executed notebook
Writes schedule.png, losses.png, snapshots.png, resume.png, batch_size.png,
checkpoint_cyc_{i}.pt and model.pt (the run's final weights) to runs/lesson2_snapshots (--out).
Validation images only: the test set is kept for lesson2.py's end.
"""
import time

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from common import (check, check_accuracy, check_size, command_line, fashion_data, float_above,
                    int_in, parse_args, show, split_sizes, threads_note)
from minicnn.augment import side_on
from minicnn.batch_size import find_batch_size
from minicnn.checkpoint import load_checkpoint, save_checkpoint
from minicnn.data import Batches, stratified_subset
from minicnn.export import export_model
from minicnn.models import simple_resnet
from minicnn.optim import SGD
from minicnn.plots import plot_losses, plot_schedule, save_png
from minicnn.schedule import cycle_end_steps, sgdr_lr, total_steps
from minicnn.snapshot import Snapshots, ensemble_predict, predict_each
from minicnn.train import accuracy, fit
from minicnn.tta import predict_tta

# %% [markdown]
# # Lesson 2, step 8: SGDR with growing cycles, and a snapshot at each cycle's end
#
# The last step of the fast.ai recipe trains with SGDR and `cycle_mult=2`: the learning rate
# falls along a cosine, jumps back to the top, and each cycle lasts twice as long as the one
# before (1, 2, 4 epochs), giving the weights longer to settle each time. At the bottom of each
# cycle the weights sit in a minimum, so a copy taken there (a *snapshot*) is a model in its own
# right: averaging the snapshots' predictions gives an ensemble for the price of one run
# (Huang et al. 2017, "Train 1, get M for free"). Around it, three practical skills: a
# checkpoint that resumes training exactly, test-time augmentation, and finding the largest
# batch that fits in memory.

# %% tags=["parameters"]
# The options of a notebook run (a script takes its command line instead), e.g. ["--quick"].
ARGV = []

# %% [markdown]
# ## Settings
#
# The default trains a small ResNet from scratch on 15,000 training images at batch 128 for 3
# cycles (7 epochs), which fits in minutes on a CPU; `--quick` uses 512 images at batch 32.
# Accuracy is measured on the validation split only.

# %%
QUICK_BATCH_SIZE = 32  # --quick: 16 steps an epoch on 512 images
# --quick: the last snapshot's validation accuracy was 0.608-0.667 over seeds 0-2 x 1-2 threads
QUICK_FLOOR = 0.4


def extra_args(parser):
    parser.add_argument("--train-size", type=int_in(1), default=None,
                        help="training images, every class in its share, so that 7 epochs fit "
                             "in minutes (default 15,000; --quick: 512; fewer when --limit "
                             "leaves fewer)")
    parser.add_argument("--cycles", default=3,
                        type=int_in(2, 8, hint=" (the resume starts from the next-to-last cycle)"),
                        help="SGDR cycles, 2 to 8: the resume starts from the next-to-last "
                             "(default %(default)s)")
    parser.add_argument("--cycle-len", type=int_in(1), default=1,
                        help="epochs in the first cycle (default %(default)s)")
    parser.add_argument("--cycle-mult", type=int_in(1, 3), default=2,
                        help="each cycle this many times as long as the one before, 1 to 3; 1 "
                             "gives Huang et al.'s equal cycles (default %(default)s)")
    parser.add_argument("--lr", type=float_above(0), default=0.1,
                        help="the peak LR of every cycle (default %(default)s)")
    parser.add_argument("--n-aug", type=int_in(0), default=4,
                        help="augmented views TTA adds to the plain view, 0: the plain view "
                             "alone (default %(default)s)")
    parser.add_argument("--search-limit", type=int_in(1), default=None,
                        help="the largest batch size the search may try, at most --train-size "
                             "(default: on a GPU the training set's size; on the CPU 1,024, "
                             "--quick: 256)")


def check_options(args, error):
    """Defaults that depend on --quick (cut to what --limit leaves); sizes within the training
    split."""
    train = split_sizes(args.limit)["train"]
    args.train_size = args.train_size or min(512 if args.quick else 15_000, train)
    check_size(error, "--train-size", args.train_size, high=train,
               what=f"the training split holds {train:,} images; a bigger --limit gives more")
    if args.search_limit is not None and args.search_limit > args.train_size:
        error(f"argument --search-limit: {args.search_limit} is more than the "
              f"{args.train_size:,} training images (--train-size); a batch cannot be bigger "
              "than the data")


args = parse_args(
    "Lesson 2, step 8: SGDR with growing cycles takes a snapshot and a checkpoint at the end of "
    "each cycle; the snapshots are compared alone and as ensembles, with and without TTA; a run "
    "resumed from a checkpoint retraces the first; and the largest batch that fits is found by "
    "trying.",
    out="lesson2_snapshots",
    argv=command_line(ARGV),
    quick_batch_size=QUICK_BATCH_SIZE,
    extra=extra_args,
    check_options=check_options,
)

# %% [markdown]
# ## The data
#
# A sample of the training split with every class in its share, and the whole validation
# split to compare the snapshots on.

# %%
started = time.perf_counter()
data = fashion_data(args)
x, y = stratified_subset(data["x_train"], data["y_train"], args.train_size, seed=args.seed)
train = Batches(x, y, args.batch_size, shuffle=True,
                generator=torch.Generator().manual_seed(args.seed), device=args.device)
valid, y_valid = data["valid"], data["y_valid"]
print(f"Fashion-MNIST: {len(x)} train, {len(y_valid)} valid images; "
      f"{args.device} ({threads_note()})")

# %% [markdown]
# ## SGDR, with a snapshot and a checkpoint at each cycle's end
#
# `fit` calls its one hook, `at_cycle_end`, right after the last step of each cycle, where the
# cosine has brought the learning rate to its lowest; one step later it is back at the top and
# the weights are on their way out of the minimum. The hook copies the weights (`Snapshots`)
# and writes a checkpoint: the weights, the optimizer's momentum, the step, and the state of the
# augmentation's random generator, everything needed to carry on later as if never stopped.
#
# In the losses figure, follow the validation loss, measured after every epoch: an epoch just
# after a restart, with the learning rate high again, can be worse than the end of the cycle
# before, and the end of the next cycle is lower again. That is why snapshots are taken only at
# the cycles' ends.

# %%
steps_per_cycle, cycle_mult = args.cycle_len * len(train), args.cycle_mult
n_steps = total_steps(args.cycles, steps_per_cycle=steps_per_cycle, cycle_mult=cycle_mult)
ends = cycle_end_steps(args.cycles, steps_per_cycle=steps_per_cycle, cycle_mult=cycle_mult)


def lr_at(step):
    return sgdr_lr(step, steps_per_cycle=steps_per_cycle, cycle_mult=cycle_mult, lr_max=args.lr)


def new_run(args, seed):
    """Model, optimizer, and the augmentation with its own generator (a checkpoint restores it)."""
    torch.manual_seed(seed)
    model = simple_resnet(10).to(args.device)
    opt = SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(seed)
    return model, opt, generator, side_on(generator=generator)


def at_cycle_end(model, step):
    snaps(model, step)
    save_checkpoint(args.out / f"checkpoint_cyc_{len(snaps) - 1}.pt", model=model, optimizer=opt,
                    step=step + 1, generators={"augment": generator})  # step + 1 steps done


model, opt, generator, augment = new_run(args, args.seed)
snaps = Snapshots()
history = fit(model, train, valid, opt, lr_at, n_steps // len(train), augment=augment,
              on_cycle_end=at_cycle_end, cycle_ends=ends)
sgdr = f"SGDR, cycle_len={args.cycle_len}, cycle_mult={cycle_mult}"
show(plot_losses(history, args.out / "losses.png", title=f"{sgdr}, side_on augmentation"))

# %% [markdown]
# ## Where the snapshots were taken
#
# The learning rate of every step, as `fit` set it, with a red dot where each snapshot was
# taken. Check that every dot sits at the bottom of its cycle, never on the jump after it.

# %%
lrs = [lr[0] for lr in history.batch_lr]
fig = plot_schedule({sgdr: lrs}, title="a snapshot at the end of each cycle")
fig.axes[0].plot(ends, [lrs[s] for s in ends], "o", color="red", label="snapshot")
fig.axes[0].legend()
fig.tight_layout()
save_png(fig, args.out / "schedule.png")
show(fig)

# %% [markdown]
# ## Snapshots alone and together, with and without TTA
#
# Each snapshot's validation accuracy, then the ensembles of the last 2, 3... snapshots: the
# mean of their probabilities (not of their weights, which come from different minima). Each
# with the plain view alone and with TTA (the plain view plus `--n-aug` augmented views). The
# last snapshot is the run's final weights, the one to beat. An ensemble pays when its members
# are about equally good; with `cycle_mult=2` the early snapshots had only a fraction of the
# training, so compare the bars before trusting the idea.

# %%
def table(model, snaps, valid, y_valid, args, n_per_epoch):
    """Rows (name, plain accuracy, TTA accuracy), and the per-snapshot plain probabilities."""
    def tta(model, batches):  # a new seeded generator each call: every snapshot sees the same views
        return predict_tta(model, batches, augment="side_on", n_aug=args.n_aug,
                           generator=torch.Generator().manual_seed(args.seed))

    plain = predict_each(model, snaps, valid)  # one (N, 10) probability tensor per snapshot
    with_tta = predict_each(model, snaps, valid, predict_fn=tta)
    rows = []
    for i, step in enumerate(snaps.steps):
        epochs = (step + 1) // n_per_epoch
        name = f"snapshot {i + 1} ({epochs} epoch{'s' * (epochs > 1)}, step {step})"
        rows.append((name + (", the last" if i == len(snaps) - 1 else ""),
                     accuracy(plain[i], y_valid), accuracy(with_tta[i], y_valid)))
    # the ensemble of the last M is the mean of their probabilities
    for m in range(2, len(snaps) + 1):
        rows.append((f"ensemble of the last {m}", accuracy(sum(plain[-m:]) / m, y_valid),
                     accuracy(sum(with_tta[-m:]) / m, y_valid)))
    return rows, plain


def plot_table(rows, path, n_aug):
    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot()
    at = torch.arange(len(rows)).float()
    ax.barh(at - 0.2, [r[1] for r in rows], height=0.4, label="plain")
    ax.barh(at + 0.2, [r[2] for r in rows], height=0.4,
            label=f"TTA (plain + {n_aug} side-on views)")
    ax.set_yticks(at.tolist(), [r[0] for r in rows], fontsize=8)
    values = [v for r in rows for v in r[1:]]
    ax.set_xlim(max(0.0, min(values) - 0.02), min(1.0, max(values) + 0.01))
    ax.set_xlabel("validation accuracy")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_png(fig, path)
    return fig


rows, plain = table(model, snaps, valid, y_valid, args, len(train))
ensemble = ensemble_predict(model, snaps, valid)  # all of them, for the self-check
width = max(len(r[0]) for r in rows)
print(f"\n{'validation accuracy':{width}s} {'plain':>7s} {'TTA':>7s}")
for name, acc, acc_tta in rows:
    print(f"{name:{width}s} {acc:7.4f} {acc_tta:7.4f}")
show(plot_table(rows, args.out / "snapshots.png", args.n_aug))
last, best = rows[len(snaps) - 1], max(rows[len(snaps):], key=lambda r: r[1])
print(f"best ensemble ({best[0]}) minus the last snapshot: "
      f"{100 * (best[1] - last[1]):+.2f} points plain, {100 * (best[2] - last[2]):+.2f} with "
      f"TTA; TTA on the last: {100 * (last[2] - last[1]):+.2f}")

# %% [markdown]
# ## The model, kept
#
# `model.pt` keeps the run's final weights, the last snapshot, with all a prediction needs: the
# architecture, the class names, the image size and channels, and the augmentation it was
# trained with, `side_on`, so that a prediction can use TTA's views. It is written now: at the
# end of this lesson the model trains 3 more steps, at the batch size found.
# `python -m minicnn.predict runs/lesson2_snapshots/model.pt IMAGES... --tta` predicts new
# images with it, and `minicnn.export.load_model` rebuilds it without any training code.

# %%
# model holds the final weights again (predict_each put them back); no test accuracy: this
# lesson measures none
export_model(args.out / "model.pt", model, arch="simple_resnet",
             arch_kwargs={"widths": (16, 32, 64)},  # simple_resnet's default, as built above
             classes=data["classes"], size=28, channels=1, preset="side_on")
print(f"\nthe run's final model (the last snapshot) in {args.out / 'model.pt'}")

# %% [markdown]
# ## Resume from a checkpoint, exactly
#
# A fresh model, started from other random weights, loads the checkpoint written at the end of
# the next-to-last cycle and trains one epoch from there. If the checkpoint holds everything the
# run depends on, the second run must compute the very same numbers: its losses equal the first
# run's, bit for bit on the CPU. In the figure the resumed run's dots should sit exactly on the
# first run's line.

# %%
resumed, resumed_opt, resumed_generator, resumed_augment = new_run(args, args.seed + 100)
path = args.out / f"checkpoint_cyc_{len(snaps) - 2}.pt"
resume_step = load_checkpoint(path, model=resumed, optimizer=resumed_opt,
                              generators={"augment": resumed_generator}).step
again = fit(resumed, train, None, resumed_opt, lr_at, resume_step // len(train) + 1,
            augment=resumed_augment, start_step=resume_step, verbose=False)
first = history.batch_loss[resume_step:resume_step + len(train)]
exact = again.batch_loss == first
# bit for bit on the CPU; CUDA kernels may sum in a different order from run to run
same = exact or (args.device != "cpu" and all(abs(a - b) <= 1e-3 * max(1.0, abs(b))
                                              for a, b in zip(again.batch_loss, first)))
print(f"\nresumed from {path.name} at step {resume_step}: {len(again.batch_loss)} steps, losses "
      + ("identical to the first run's, bit for bit" if exact
         else "within 0.1% of the first run's" if same else "DIFFERENT from the first run's"))
fig = plot_schedule({"first run": history.batch_loss,
                     f"resumed at step {resume_step}": [float("nan")] * resume_step
                     + again.batch_loss},
                    title="training loss per step: the resumed run retraces the first")
fig.axes[0].set_ylabel("training loss")
fig.axes[0].lines[1].set(linestyle="none", marker=".", markersize=3)  # dots on the first run's line
fig.axes[0].legend()
fig.tight_layout()
save_png(fig, args.out / "resume.png")
show(fig)

# %% [markdown]
# ## The largest batch that fits
#
# The course's advice: make batches as big as memory allows. `find_batch_size` finds the size by
# trying: each try runs 3 real training steps at a batch size, doubling it until a try runs out
# of memory, then bisecting between the last size that fit and the first that did not. It
# survives every out-of-memory error, so training goes on in the same process, and it puts the
# weights back as they were. On a GPU the wall is its memory. On a shared CPU running out of
# memory would hurt everyone on the machine, so there the search stops at `--search-limit`. In
# the figure: green tries fit, red ones ran out of memory, and the dashed line is the size to use.

# %%
probe_augment = side_on(generator=torch.Generator().manual_seed(args.seed + 1))
tried, fitted = [], []


def try_step(batch_size):
    """3 real training steps at this batch size (it keeps nothing, so a failed try frees all)."""
    tried.append(batch_size)
    xb = x[:batch_size].to(args.device).float().div_(255)  # (b, 1, 28, 28)
    yb = y[:batch_size].to(args.device)
    for _ in range(3):
        F.cross_entropy(model(probe_augment(xb)), yb).backward()
        opt.step()
        opt.zero_grad()
    fitted.append(batch_size)  # reached only without an out-of-memory error


def plot_search(tried, fitted, found, path):
    """The sizes tried, in order (log scale): green fit, red ran out of memory; the size chosen."""
    fig = Figure(figsize=(6, 3))
    ax = fig.add_subplot()
    for i, size in enumerate(tried):
        ax.plot(i + 1, size, "o", color="tab:green" if size in fitted else "tab:red")
    ax.axhline(found, color="0.5", linestyle="--", label=f"batch size to use: {found}")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("try (3 training steps each); green fits, red out of memory")
    ax.set_ylabel("batch size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    return fig


weights = {k: v.clone() for k, v in model.state_dict().items()}
on_gpu = args.device != "cpu"
limit = min(len(x), args.search_limit or (len(x) if on_gpu else 256 if args.quick else 1024))
print(f"\nLargest batch that fits: 3 training steps a try, limit {limit} "
      + ("(the training set), until the GPU runs out of memory" if on_gpu else
         "(--search-limit: on a shared CPU the limit is the wall, not the memory)"))
before = torch.cuda.memory_allocated() if on_gpu else 0
found = find_batch_size(try_step, limit=limit, model=model, optimizer=opt, verbose=True)
print(f"{len(tried)} tries, {len(tried) - len(fitted)} out-of-memory errors survived; largest "
      f"that fit: {max(fitted)}; batch size to use: {found} "
      + ("(the limit: it fit, so no margin)" if found == limit else "(90% of it: headroom)"))
if on_gpu:
    print(f"GPU memory allocated before the search {before / 2**20:.0f} MB, after "
          f"{torch.cuda.memory_allocated() / 2**20:.0f} MB")
show(plot_search(tried, fitted, found, args.out / "batch_size.png"))
unchanged = all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
try_step(found)  # training goes on in the same process, at the size found
print(f"then 3 more training steps at batch size {found} in this process; "
      f"total time {time.perf_counter() - started:.0f}s")

# %% [markdown]
# ## Self-check
#
# Every snapshot must sit at its cycle's last step, where the learning rate is the cycle's
# lowest, and the ensemble must be the mean of the snapshots' probabilities. The last snapshot
# must beat a floor, the most common class's share and what guessing could reach by luck, so an
# untrained network cannot pass; in the default run TTA must not cost it more than half a
# point. The resumed run must retrace the first, and the batch-size search must leave the
# weights as they were. Ensembles are reported, not required to win.

# %%
starts = [0] + [end + 1 for end in ends[:-1]]
check(snaps.steps == ends
      and all(lrs[end] == min(lrs[start:end + 1]) for start, end in zip(starts, ends)),
      f"a snapshot at each cycle's last step {ends}, where the LR is the cycle's minimum")
check(torch.allclose(ensemble, sum(plain) / len(plain), atol=1e-6),
      "ensemble_predict = the mean of the snapshots' probabilities")
# The last snapshot has learned (87.2% by default), and TTA does not cost it more than half a
# point (the quick run's 102 images are too few to say). Ensembles are reported, not required
# to win: with cycle_mult=2 the earlier snapshots had 1/7 and 3/7 of the training.
check_accuracy(last[1], y_valid, floor=QUICK_FLOOR if args.quick else 0.86,
               what="the last snapshot's validation accuracy")
if not args.quick:
    check(last[2] >= last[1] - 0.005,
          f"TTA costs the last snapshot at most half a point: {last[1]:.4f} -> {last[2]:.4f}")
check(same, f"the run resumed at step {resume_step} retraced the first run's losses")
check(unchanged and 1 <= found <= limit,
      f"the search left the weights as they were and found {found} <= {limit}")
