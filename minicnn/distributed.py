"""Data parallel training under torchrun: W processes, one model each, the same step on every one.

    rank r takes samples [r*b//W, (r+1)*b//W) of each global batch of b (the order: seed, epoch)
    g = (1/W) * sum_r g_r        every rank applies the mean gradient (sum_r n_r*g_r / sum_r n_r
                                 when the shares n_r differ), so the weights stay identical
    metrics: sums (loss * n, correct, n) added over the ranks; each image counted once
Gradients are averaged by one explicit all-reduce that fit calls after backward
(fit(..., after_backward=average_gradients, all_sum=all_sum)), not by DistributedDataParallel:
freezing and unfreezing then act at once on every rank, and state_dict keys stay the model's.
Rank 0 alone writes files and runs the LR range test; run_on_main sends its result, or its error.
Sources: PyTorch DDP and torch.distributed; nanoGPT's train.py; pytorch/examples' imagenet.
docs/distributed.md: why not DDP, the LR and batch-size rules, BatchNorm, the torchrun commands.
"""
import datetime
import itertools
import math
import numbers
import os
import pickle
from collections import namedtuple

import torch
import torch.distributed as dist

Rank = namedtuple("Rank", "rank world_size local_rank device")
ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what torchrun sets for each process


def _int(value, name, low=0):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _world():
    """(rank, world size) of this process: (0, 1) without a process group."""
    return ((dist.get_rank(), dist.get_world_size())
            if dist.is_available() and dist.is_initialized() else (0, 1))


def _rank_and_world(rank, world_size):
    """Explicit rank and world size (both, checked) or the process group's."""
    if rank is None and world_size is None:
        return _world()
    if rank is None or world_size is None:
        raise ValueError("pass rank= and world_size= together, or neither (then the process "
                         "group's are used)")
    world_size = _int(world_size, "world_size", low=1)
    if not 0 <= _int(rank, "rank") < world_size:
        raise ValueError(f"rank={rank} must be in 0 .. world_size - 1 = {world_size - 1}")
    return rank, world_size


def setup(*, backend=None, timeout=None):
    """Start the process group from torchrun's RANK, WORLD_SIZE, LOCAL_RANK -> Rank(rank,
    world_size, local_rank, device): gloo on the CPU, nccl on CUDA with cuda:LOCAL_RANK as this
    process's device. Without those variables: one process, no group, Rank(0, 1, 0, cuda or cpu).
    timeout: seconds a collective waits for the other ranks before it fails (None: torch's
    default)."""
    present = [name for name in ENVIRONMENT if name in os.environ]
    cuda = torch.cuda.is_available()
    if not present:
        return Rank(0, 1, 0, torch.device("cuda" if cuda else "cpu"))
    if (len(present) < len(ENVIRONMENT)
            or not all(os.environ.get(n) for n in ("MASTER_ADDR", "MASTER_PORT"))):
        missing = [n for n in ENVIRONMENT + ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
        raise RuntimeError(f"setup: {', '.join(present)} set but {', '.join(missing)} not: start "
                           "every process with torchrun (it sets them all), or unset RANK, "
                           "WORLD_SIZE, LOCAL_RANK for one process")
    try:
        rank, world_size, local_rank = (int(os.environ[name]) for name in ENVIRONMENT)
    except ValueError:
        raise ValueError(f"setup: RANK, WORLD_SIZE, LOCAL_RANK must be integers, got "
                         f"{[os.environ[n] for n in ENVIRONMENT]}") from None
    if not (0 <= rank < world_size and 0 <= local_rank < world_size):
        raise ValueError(f"setup: need 0 <= RANK, LOCAL_RANK < WORLD_SIZE, got RANK={rank}, "
                         f"LOCAL_RANK={local_rank}, WORLD_SIZE={world_size}")
    backend = backend or ("nccl" if cuda else "gloo")
    if backend not in ("gloo", "nccl") or (backend == "nccl" and not cuda):
        raise ValueError(f"setup: backend={backend!r}; use 'gloo' (CPU) or 'nccl' (needs CUDA, "
                         f"available: {cuda})")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)
                                or timeout <= 0):
        raise ValueError(f"setup: timeout must be a number of seconds > 0 or None, got {timeout!r}")
    if dist.is_initialized():
        raise RuntimeError("setup: the process group is already set up; call teardown() before a "
                           "second setup()")
    device = torch.device("cpu")
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"setup: LOCAL_RANK={local_rank} but this machine has "
                               f"{torch.cuda.device_count()} GPU(s): start at most that many "
                               "processes per machine (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
        # nccl's collectives (and broadcast_object_list) use the current device
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            **({"timeout": datetime.timedelta(seconds=timeout)} if timeout else {}))
    return Rank(rank, world_size, local_rank, device)


def teardown():
    """End the process group (nothing to do in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main():
    """True on rank 0 (and in a single process): the one that prints and writes files."""
    return _world()[0] == 0


def _device():
    """Where collectives' tensors live: the current GPU for nccl, else the CPU."""
    return (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
            else torch.device("cpu"))


def _same_on_every_rank(values, what, advice):
    """Every rank's list of ints -> a ValueError on every rank if they differ (one all_gather)."""
    mine = torch.tensor(values, dtype=torch.int64, device=_device())
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    if any(not torch.equal(mine, other) for other in everyone):
        raise ValueError(f"{what} differ across ranks ("
                         + "; ".join(f"rank {r}: {t.tolist()}" for r, t in enumerate(everyone))
                         + f"): {advice}")


class Shard:
    """This rank's share of every minibatch of `batches`, in the global order: len() and
    .epoch(e, skip=k) as `batches` has them (Batches, or any re-iterable loader with len())."""

    def __init__(self, batches, *, rank=None, world_size=None):
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        try:
            len(batches)
        except TypeError:
            raise TypeError(f"Shard: batches must have a len() (Batches, a DataLoader, a list), "
                            f"got {type(batches).__name__}") from None
        self.batches, W = batches, self.world_size
        size, x = getattr(batches, "batch_size", None), getattr(batches, "x", None)
        # a Batches: its batch sizes are known now
        if isinstance(size, int) and isinstance(x, torch.Tensor):
            last = len(x) % size if not getattr(batches, "drop_last", False) else 0
            if size < W or 0 < last < W:
                raise ValueError(f"Shard: batches of {min(size, last or size)} sample(s) cannot "
                                 f"be shared by {W} ranks (one would get none): use batch_size >= "
                                 f"{W}, and drop_last=True or a batch_size that leaves a last "
                                 f"batch of at least {W}")
        if dist.is_available() and dist.is_initialized() and getattr(batches, "shuffle", False):
            _same_on_every_rank([getattr(batches, "seed", 0)],
                                "Shard: the Batches' seeds, so their orders,",
                                "build them with generator=torch.Generator().manual_seed(s), the "
                                "same s on every rank")

    def __len__(self):
        return len(self.batches)

    def epoch(self, epoch, *, skip=0):
        """Epoch `epoch`'s global batches from batch `skip` on, each cut to this rank's share."""
        if hasattr(self.batches, "epoch"):
            return self._share(self.batches.epoch(epoch, skip=skip))
        return self._share(itertools.islice(iter(self.batches), skip, None))

    def __iter__(self):
        return self._share(iter(self.batches))

    def _share(self, batches):
        r, W = self.rank, self.world_size
        for x, y in batches:
            b = len(x)
            if b < W:
                raise ValueError(f"Shard: a batch of {b} sample(s) cannot be shared by {W} ranks: "
                                 "use drop_last=True, or another batch_size")
            lo, hi = r * b // W, (r + 1) * b // W  # rank r's share of the global batch of b
            yield x[lo:hi], (None if y is None else y[lo:hi])


def rank_slice(n, *, rank=None, world_size=None):
    """This rank's part of n samples for evaluation: slice(r*n//W, (r+1)*n//W). The parts are
    disjoint and cover all n once: no padding, no duplicates (unlike DistributedSampler)."""
    r, W = _rank_and_world(rank, world_size)
    if _int(n, "n") < W:
        raise ValueError(f"rank_slice: {n} samples cannot be shared by {W} ranks (one would get "
                         "none)")
    return slice(r * n // W, (r + 1) * n // W)


def gather(t):
    """Every rank's tensor (n_r, ...) concatenated in rank order, on every rank: with rank_slice's
    parts, the predictions of the whole set in its original order. One process: t itself."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        raise TypeError(f"gather: t must be a tensor (n, ...), got {type(t).__name__}")
    if _world()[1] == 1:
        return t
    shapes = [None] * dist.get_world_size()
    dist.all_gather_object(shapes, (len(t), tuple(t.shape[1:]), str(t.dtype)))
    if len({shape[1:] for shape in shapes}) > 1:
        raise ValueError("gather: the ranks' tensors differ beyond their first dimension: "
                         + "; ".join(f"rank {r}: {s[1]} {s[2]}" for r, s in enumerate(shapes)))
    longest = max(shape[0] for shape in shapes)
    padded = torch.zeros((longest,) + tuple(t.shape[1:]), dtype=t.dtype, device=_device())
    padded[:len(t)] = t  # all_gather needs equal sizes: pad, then cut back
    parts = [torch.empty_like(padded) for _ in shapes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:shape[0]] for part, shape in zip(parts, shapes)]).to(t.device)


def average_gradients(model, n, loss=0.0):
    """After backward: every rank's gradients -> their mean over the global batch; the running
    statistics of BatchNorm layers that train and the loss too -> the global batch's mean loss.
    n: samples in this rank's share. One process: nothing to do, loss given back. fit calls it
    between backward and the step when given after_backward=average_gradients."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"average_gradients: model must be an nn.Module, got "
                        f"{type(model).__name__}")
    if (_int(n, "average_gradients: n") == 0 or isinstance(loss, bool)
            or not isinstance(loss, numbers.Real)):
        raise ValueError(f"average_gradients: n must be >= 1 (the samples of this share), loss a "
                         f"number; got {n!r}, {loss!r}")
    if _world()[1] == 1:
        return float(loss)
    tensors = [p.grad for p in model.parameters() if p.grad is not None] + [
        s for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
        and m.running_mean is not None for s in (m.running_mean, m.running_var)]
    _same_on_every_rank([len(tensors), sum(t.numel() for t in tensors)],
                        "average_gradients: the gradients to average (count, numbers)",
                        "freeze, unfreeze and bn_freeze on every rank, not inside `if is_main()`; "
                        "every rank must build the same model")
    extra = torch.tensor([float(loss), 1.0], device=tensors[0].device if tensors else _device())
    # n_r * [g_r, loss_r, 1]
    flat = torch.cat([t.reshape(-1) for t in tensors] + [extra]).to(_device()) * n
    dist.all_reduce(flat)     # sum_r n_r * [g_r, loss_r, 1]
    flat /= flat[-1].clone()  # / sum_r n_r
    for t, mean in zip(tensors, flat[:-2].split([t.numel() for t in tensors])):
        t.copy_(mean.view_as(t))
    return flat[-2].item()


def all_sum(t):
    """t summed over every rank, in place -> t (evaluate's sums); one process: t as it is."""
    if _world()[1] > 1:
        dist.all_reduce(t)
    return t


def broadcast_weights(model):
    """Rank 0's parameters and buffers copied into every rank's model (DDP does this once, at
    wrapping)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"broadcast_weights: model must be an nn.Module, got "
                        f"{type(model).__name__}")
    if _world()[1] == 1:
        return model
    state = list(model.state_dict().values())  # the live tensors: broadcast writes into the model
    _same_on_every_rank([len(state), sum(t.numel() for t in state)],
                        "broadcast_weights: the models' tensors (count, numbers)",
                        "build the same model on every rank")
    with torch.no_grad():
        for t in state:
            on_device = t.to(_device())
            dist.broadcast(on_device, src=0)
            t.copy_(on_device)
    return model


def run_on_main(fn, *args, **kwargs):
    """fn(*args, **kwargs) on rank 0 alone -> its result on every rank; if it raises, every rank
    raises (rank 0 its own error), so none waits forever. Use it for the LR range test, the
    batch-size search and file writes. fn must not call fit or evaluate (they talk to all ranks)."""
    if not callable(fn):
        raise TypeError(f"run_on_main: fn must be callable, got {type(fn).__name__}")
    rank, world_size = _world()
    if world_size == 1:
        return fn(*args, **kwargs)
    box, error = [None], None
    if rank == 0:
        try:
            result = fn(*args, **kwargs)
            pickle.dumps(result)  # what broadcast will do: fail here, not on rank 0 alone
            box = [("ok", result)]
        except Exception as e:
            error, box = e, [("error", f"{type(e).__name__}: {e}")]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if error is not None:
        raise error
    if kind == "error":
        raise RuntimeError(f"run_on_main: {getattr(fn, '__name__', 'fn')} failed on rank 0: "
                           f"{value}")
    return value


def global_batch_and_lr(batch_size, lr, *, per_rank=False, world_size=None):
    """-> (global batch, lr). per_rank=False (the default): batch_size is the global batch, shared
    by the ranks, and lr stays. per_rank=True: each rank takes batch_size, so B = W * batch_size and
    lr_W = W * lr (the linear scaling rule, Goyal et al. 2017; warm up when W is large)."""
    W = _world()[1] if world_size is None else _int(world_size, "world_size", low=1)
    _int(batch_size, "batch_size", low=1)
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not 0 < lr < math.inf:
        raise ValueError(f"global_batch_and_lr: lr must be a number > 0, got {lr!r}")
    return (batch_size * W, lr * W) if per_rank else (batch_size, lr)  # B = W * b, lr_W = W * lr
