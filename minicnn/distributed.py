"""Data parallel training under torchrun: W processes, one model each, the same step on every one.

    rank r takes samples [r*b//W, (r+1)*b//W) of each global batch of b (the order: seed, epoch)
    g = sum_r n_r*g_r / sum_r n_r   (= (1/W) * sum_r g_r for equal shares n_r), on every rank
    metrics: sums (loss * n, correct, n) added over the ranks; each image counted once
One all-reduce after backward (fit's after_backward), not DDP: freezing acts on every rank at once.
Sources: PyTorch DDP and torch.distributed; nanoGPT's train.py; pytorch/examples' imagenet.
docs/distributed.md: why not DDP, the LR and batch-size rules, BatchNorm, the torchrun commands.
"""
import datetime
import itertools
import os
import pickle
from collections import namedtuple

import torch
import torch.distributed as dist

Rank = namedtuple("Rank", "rank world_size local_rank device")
ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what torchrun sets for each process


def average_gradients(model, n, loss=0.0):
    """After backward: gradients, train-mode BatchNorm running statistics and the loss -> their
    means over the global batch, on every rank (n: this share's samples). One process: loss back."""
    if _world()[1] == 1:
        return float(loss)
    tensors = [p.grad for p in model.parameters() if p.grad is not None] + [
        s for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
        and m.running_mean is not None for s in (m.running_mean, m.running_var)]
    # a rank that froze a group alone would send a shorter buffer: a crash here, a silent mix there
    _same_on_every_rank([len(tensors), sum(t.numel() for t in tensors)], "average_gradients: the "
                        "gradients to average", "freeze, unfreeze and bn_freeze on every rank")
    extra = torch.tensor([float(loss), 1.0], device=tensors[0].device if tensors else _device())
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


class Shard:
    """This rank's share of every minibatch of `batches`, in the global order: len() and
    .epoch(e, skip=k) as `batches` has them (Batches, or any re-iterable loader with len())."""

    def __init__(self, batches, *, rank=None, world_size=None):
        self.batches = batches
        self.rank, self.world_size = _world(rank, world_size)
        if isinstance(getattr(batches, "x", None), torch.Tensor):  # a Batches: sizes known now
            b = batches.batch_size  # its smallest batch: b, or the last one if that is shorter
            _check_share(min(b, len(batches.x) - (len(batches) - 1) * b), self.world_size)
        if _world()[1] > 1 and getattr(batches, "shuffle", False):  # one order on every rank
            _same_on_every_rank([getattr(batches, "seed", 0)], "Shard: the Batches' seeds",
                                "seed them with torch.Generator().manual_seed(s), the same s")

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
            _check_share(b, W)  # a plain loader's batch sizes are seen only now
            lo, hi = r * b // W, (r + 1) * b // W  # rank r's share of the global batch of b
            yield x[lo:hi], (None if y is None else y[lo:hi])


def rank_slice(n, *, rank=None, world_size=None):
    """This rank's part of n samples, slice(r*n//W, (r+1)*n//W): the parts cover all n once."""
    r, W = _world(rank, world_size)
    return slice(r * n // W, (r + 1) * n // W)


def gather(t):
    """Every rank's tensor (n_r, ...) concatenated in rank order, on every rank; one process: t."""
    if _world()[1] == 1:
        return t
    shapes = [None] * dist.get_world_size()
    dist.all_gather_object(shapes, (len(t), tuple(t.shape[1:]), str(t.dtype)))
    if len({shape[1:] for shape in shapes}) > 1:
        raise ValueError(f"gather: the ranks' tensors differ beyond their first dimension {shapes}")
    padded = t.new_zeros((max(s[0] for s in shapes), *t.shape[1:]), device=_device())
    padded[:len(t)] = t  # all_gather needs equal sizes: pad, then cut back
    parts = [torch.empty_like(padded) for _ in shapes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:shape[0]] for part, shape in zip(parts, shapes)]).to(t.device)


def broadcast_weights(model):
    """Rank 0's parameters and buffers copied into every rank's model (DDP does this once)."""
    if _world()[1] == 1:
        return model
    state = list(model.state_dict().values())  # the live tensors: broadcast writes into the model
    _same_on_every_rank([len(state), sum(t.numel() for t in state)], "broadcast_weights: the "
                        "models' tensors", "build the same model on every rank")
    for t in state:  # detached: copy_ needs no torch.no_grad()
        on_device = t.to(_device())
        dist.broadcast(on_device, src=0)
        t.copy_(on_device)
    return model


def run_on_main(fn, *args, **kwargs):
    """fn(*args, **kwargs) on rank 0 alone (the LR range test, file writes) -> its result on every
    rank, or its error raised on every rank. fn must not call fit or evaluate (collectives)."""
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
    if kind == "error":  # rank 0 raises its own error, the others one that names it
        raise error or RuntimeError(f"run_on_main: failed on rank 0: {value}")
    return value


def setup(*, backend=None, timeout=None):
    """torchrun's RANK, WORLD_SIZE, LOCAL_RANK -> the process group (gloo on the CPU, nccl on
    cuda:LOCAL_RANK) and Rank(rank, world_size, local_rank, device); without them Rank(0, 1, 0, cuda
    or cpu). timeout: seconds a collective waits for the others (None: torch's default)."""
    cuda = torch.cuda.is_available()
    if not any(name in os.environ for name in ENVIRONMENT):
        return Rank(0, 1, 0, torch.device("cuda" if cuda else "cpu"))
    rank, world_size, local_rank = (int(os.environ[name]) for name in ENVIRONMENT)
    gpus = torch.cuda.device_count()
    if not 0 <= rank < world_size:  # else init_process_group waits for a rank that never comes
        raise ValueError(f"setup: RANK={rank} must be in 0 .. WORLD_SIZE - 1 = {world_size - 1}")
    if cuda and local_rank >= gpus:  # else CUDA's 'invalid device ordinal'
        raise RuntimeError(f"setup: LOCAL_RANK={local_rank}, {gpus} GPU(s): lower --nproc_per_node")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:  # nccl's collectives (and broadcast_object_list) use the current device
        torch.cuda.set_device(device)
    timeout = None if timeout is None else datetime.timedelta(seconds=timeout)
    dist.init_process_group(backend or ("nccl" if cuda else "gloo"), rank=rank,
                            world_size=world_size, timeout=timeout)
    return Rank(rank, world_size, local_rank, device)


def teardown():
    """End the process group (nothing to do in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main():
    """True on rank 0 (and in a single process): the one that prints and writes files."""
    return _world()[0] == 0


def _world(rank=None, world_size=None):  # (rank, W): the ones given, the group's, or (0, 1)
    if rank is not None or world_size is not None:
        if not 0 <= rank < world_size:  # else an empty share, silently
            raise ValueError(f"rank={rank} must be in 0 .. world_size - 1 = {world_size - 1}")
        return rank, world_size
    return ((dist.get_rank(), dist.get_world_size())
            if dist.is_available() and dist.is_initialized() else (0, 1))


def _device():  # where collectives' tensors live: the current GPU for nccl, else the CPU
    return (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
            else torch.device("cpu"))


def _same_on_every_rank(values, what, advice):  # a list of ints; unequal: ValueError on each rank
    mine = torch.tensor(values, dtype=torch.int64, device=_device())
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    if any(not torch.equal(mine, other) for other in everyone):
        raise ValueError(f"{what} differ across ranks {[t.tolist() for t in everyone]}: {advice}")


def _check_share(b, W):  # a global batch of b < W would leave a rank with no sample (a NaN loss)
    if b < W:
        raise ValueError(f"Shard: a batch of {b} for {W} ranks: batch_size >= {W}, drop_last=True")
