"""Data parallel training on the CPU: 2 processes with gloo, forked by the test, each set up by
distributed.setup from torchrun's variables. After every step the ranks hold the same weights, bit
for bit, and those match one process over the same global batches (BatchNorm in eval mode or
absent: in train mode each rank normalises with its own share's statistics, and the test says so).
Evaluation counts each sample once; a 2-rank checkpoint resumes exactly; freezing acts on every
rank; rank 0 runs the LR range test for all; an error or a hang on one rank stops the others."""
import dataclasses
import functools
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import blobs
import torch
import torch.multiprocessing as mp
from torch import nn

from minicnn import distributed
from minicnn.batch_size import find_batch_size
from minicnn.checkpoint import load_checkpoint, save_checkpoint
from minicnn.data import Batches
from minicnn.distributed import Shard, gather, rank_slice, run_on_main
from minicnn.freeze import bn_freeze, freeze, unfreeze
from minicnn.lr_find import lr_find
from minicnn.models import GroupedModel, simple_resnet
from minicnn.train import evaluate, fit, predict

REPO = Path(__file__).resolve().parent.parent
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ---- the harness: W forked processes, each a rank of a gloo group -------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, folder, fn, args, timeout):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        distributed.setup(timeout=timeout)
        result = ("ok", fn(rank, *args))
    except Exception as error:
        result = ("error", f"{type(error).__name__}: {error}")
    torch.save(result, Path(folder) / f"rank{rank}.pt")
    try:
        distributed.teardown()
    finally:
        os._exit(0)  # a forked child: leave without the parent's exit handlers


@functools.cache
def _warm_up():
    """One tiny fit here first, so that the forked ranks inherit torch's lazy imports (a second each)."""
    run(mlp(), global_batches(), 1)


def run_ranks(fn, *args, folder, world_size=2, timeout=20, deadline=60, may_hang=()):
    """fn(rank, *args) on every rank -> [("ok", value) or ("error", "Type: message")] by rank.
    A rank still running after `deadline` seconds fails the test (a hang), unless it is in may_hang."""
    _warm_up()
    folder.mkdir(parents=True, exist_ok=True)
    ctx, port = mp.get_context("fork"), _free_port()
    ranks = [ctx.Process(target=_rank_main, args=(r, world_size, port, str(folder), fn, args, timeout))
             for r in range(world_size)]
    for process in ranks:
        process.start()
    end = time.monotonic() + deadline
    for r, process in enumerate(ranks):
        if r not in may_hang:
            process.join(max(0.0, end - time.monotonic()))
    hung = [r for r, p in enumerate(ranks) if p.is_alive() and r not in may_hang]
    for process in ranks:
        if process.is_alive():
            process.kill()
            process.join()
    assert not hung, f"ranks {hung} still running after {deadline}s: they hang"
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) if (folder / f"rank{r}.pt").exists()
            else ("killed", None) for r in range(world_size)]


def values(results):
    errors = [f"rank {r}: {v}" for r, (kind, v) in enumerate(results) if kind != "ok"]
    assert not errors, "\n".join(errors)
    return [v for _, v in results]


def assert_identical(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"not bit-identical: {different}"


def assert_close(a, b, **tolerance):
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], **tolerance, msg=lambda m: f"{k}: {m}")


# ---- data, models, a run ------------------------------------------------------------------------

def mlp(seed=0):
    torch.manual_seed(seed)
    return GroupedModel(nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU()), nn.Linear(8, 2))


def tiny_resnet(seed=0):
    torch.manual_seed(seed)
    return simple_resnet(2, widths=(4, 4))


def global_batches(batch_size=15, n=40):
    """n=40 in batches of 15: two of 15 (shares 7 and 8), one of 10."""
    return Batches(*blobs(n), batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def run(model, batches, end_epoch, *, valid=None, opt=None, start_step=0, **options):
    opt = opt or sgd(model)
    if torch.distributed.is_initialized():  # several ranks: fit's hook averages, evaluate adds up
        options.update(after_backward=distributed.average_gradients, all_sum=distributed.all_sum)
    history = fit(model, batches, valid, opt, lambda step: 0.1, end_epoch, start_step=start_step,
                  verbose=False, **options)
    return model.state_dict(), dataclasses.asdict(history)


# ---- the same step on every rank, and the same as one process -----------------------------------

def _train(rank, make_model, bn_eval):
    model = make_model()
    if bn_eval:
        bn_freeze(model)
    xv, yv = blobs(41, seed=1)
    part = rank_slice(len(yv))
    return run(model, Shard(global_batches()), 3, valid=Batches(xv[part], yv[part], 8, shuffle=False))


@pytest.mark.parametrize("make_model, bn_eval", [(mlp, False), (tiny_resnet, True)], ids=["no BatchNorm",
                                                                                       "BatchNorm in eval mode"])
def test_every_rank_holds_the_same_weights_as_one_process_over_the_same_global_batches(make_model, bn_eval,
                                                                                       tmp_path):
    (weights0, history0), (weights1, history1) = values(run_ranks(_train, make_model, bn_eval, folder=tmp_path))
    assert_identical(weights0, weights1)  # after 9 steps, shares of 7 and 8, then 5 and 5
    assert history0 == {**history1, "seconds": history0["seconds"]}
    model = make_model()
    if bn_eval:
        bn_freeze(model)
    weights, history = run(model, global_batches(), 3, valid=Batches(*blobs(41, seed=1), 8, shuffle=False))
    assert_close(weights0, weights, rtol=1e-5, atol=1e-6)
    assert not torch.equal(weights0["layer_groups.2.2.weight" if bn_eval else "layer_groups.1.weight"],
                           make_model().state_dict()["layer_groups.2.2.weight" if bn_eval else "layer_groups.1.weight"])
    # the recorded loss is the global batch's; the validation accuracy the whole set's, exactly
    assert history0["batch_loss"] == pytest.approx(history["batch_loss"], rel=1e-5)
    assert history0["valid_acc"] == history["valid_acc"]
    assert history0["valid_loss"] == pytest.approx(history["valid_loss"], rel=1e-6)


def test_batchnorm_in_train_mode_keeps_the_ranks_identical_but_not_equal_to_one_process(tmp_path):
    """Each rank normalises with the statistics of its own share (per-rank BatchNorm, as on gloo,
    where SyncBatchNorm cannot run): the ranks still agree bit for bit, running statistics too
    (averaged over the ranks), but the weights are not those of one process over the whole batch."""
    (weights0, _), (weights1, _) = values(run_ranks(_train, tiny_resnet, False, folder=tmp_path))
    assert_identical(weights0, weights1)
    weights, _ = run(tiny_resnet(), global_batches(), 3)
    gap = max((weights0[k] - weights[k]).abs().max().item() for k in weights if weights[k].is_floating_point())
    assert gap > 1e-3, "per-rank batch statistics should change the weights"


# ---- evaluation: each sample once ---------------------------------------------------------------

def _evaluate(rank, n):
    model, (x, y) = mlp(seed=3), blobs(n, seed=2)
    part = rank_slice(n)
    local = Batches(x[part], y[part], 6, shuffle=False)
    sampler = torch.utils.data.DistributedSampler(range(n), shuffle=False)  # pads to a multiple of 2
    padded = [(x[list(sampler)], y[list(sampler)])]
    return (evaluate(model, local, all_sum=distributed.all_sum), evaluate(model, padded, all_sum=distributed.all_sum),
            gather(predict(model, local)), len(range(n)[part]))


@pytest.mark.parametrize("n", [41, 40])
def test_evaluation_counts_each_sample_once_and_gives_one_process_accuracy(n, tmp_path):
    (ours0, padded0, probs0, size0), (ours1, padded1, probs1, size1) = values(run_ranks(_evaluate, n, folder=tmp_path))
    model, (x, y) = mlp(seed=3), blobs(n, seed=2)
    loss, acc = evaluate(model, Batches(x, y, 6, shuffle=False))
    assert size0 + size1 == n and abs(size0 - size1) <= n % 2
    assert ours0 == ours1 and ours0[1] == acc and ours0[0] == pytest.approx(loss, rel=1e-6)
    assert 0 < acc < 1  # so a sample counted twice changes it
    if n % 2:  # DistributedSampler's padding counts sample 0 twice: pytorch #25162
        assert padded0[1] != acc
    probs = predict(model, Batches(x, y, 6, shuffle=False))
    torch.testing.assert_close(probs0, probs)  # gathered in the original order
    assert torch.equal(probs0, probs1)


# ---- resuming ----------------------------------------------------------------------------------

def _flip(generator):
    def augment(x):  # (B, 1, 4, 4): half of the images mirrored, per this rank's generator
        return torch.where(torch.rand(len(x), 1, 1, 1, generator=generator) < 0.5, x.flip(-1), x)
    return augment


def _resume(rank, folder, resume):
    """Epochs 0-2 with rank 0 checkpointing after step 4 (mid-epoch 1), or the same resumed from there."""
    model, generator = mlp(), torch.Generator().manual_seed(100 + rank)  # augmentation differs per rank
    opt, batches, path, listing = sgd(model), Shard(global_batches()), Path(folder) / "ckpt.pt", []
    if resume:  # a new run: every rank reads rank 0's file, then its own generator's state
        step, extra = load_checkpoint(path, model=model, optimizer=opt)
        generator.set_state(extra["augment"][rank].clone())  # a view of the row: torch 2.x segfaults
        return run(model, batches, 3, opt=opt, start_step=step, augment=_flip(generator))[0], listing

    def checkpoint(model, step):
        states = gather(generator.get_state()[None])  # (W, state bytes): each rank's augmentation stream
        run_on_main(save_checkpoint, path, model=model, optimizer=opt, step=step + 1, extra={"augment": states})
        listing.extend(sorted(os.listdir(folder)))  # after run_on_main: rank 0 has written it
    weights, _ = run(model, batches, 3, opt=opt, augment=_flip(generator), on_cycle_end=checkpoint, cycle_ends=[4])
    return weights, listing


def test_a_run_checkpointed_under_two_ranks_resumes_to_the_weights_of_the_unbroken_one(tmp_path):
    (unbroken0, files0), (unbroken1, files1) = values(run_ranks(_resume, str(tmp_path), False, folder=tmp_path / "a"))
    assert files0 == files1 == ["a", "ckpt.pt"]  # one file, written by rank 0 before any rank went on
    assert_identical(unbroken0, unbroken1)
    (resumed0, _), (resumed1, _) = values(run_ranks(_resume, str(tmp_path), True, folder=tmp_path / "b"))
    assert_identical(resumed0, resumed1)
    assert_identical(resumed0, unbroken0)  # resumed mid-epoch: Shard.epoch(1, skip=2) on each rank


def _checkpoint_plain(rank, folder):
    model = mlp()
    opt = sgd(model)
    fit(model, Shard(global_batches()), None, opt, lambda step: 0.1, 1, verbose=False,
        after_backward=distributed.average_gradients)
    run_on_main(save_checkpoint, Path(folder) / "plain.pt", model=model, optimizer=opt, step=3)


def test_a_two_rank_checkpoint_loads_into_one_process(tmp_path):
    values(run_ranks(_checkpoint_plain, str(tmp_path), folder=tmp_path / "ranks"))
    model = mlp()
    opt = sgd(model)
    step, _ = load_checkpoint(tmp_path / "plain.pt", model=model, optimizer=opt)
    resumed, _ = run(model, global_batches(), 3, opt=opt, start_step=step)
    unbroken, _ = run(mlp(), global_batches(), 3)
    assert_close(resumed, unbroken, rtol=1e-5, atol=1e-6)


# ---- freezing, the LR range test, the batch-size search ----------------------------------------

def _freeze(rank, only_rank0):
    model = mlp()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt, batches = sgd(model), Shard(global_batches())
    if rank == 0 or not only_rank0:
        freeze(model)
    frozen, _ = run(model, batches, 1, opt=opt)
    frozen = {k: v.clone() for k, v in frozen.items()}
    unfreeze(model)
    return start, frozen, run(model, batches, 2, opt=opt, start_step=3)[0]


def test_freezing_and_unfreezing_take_effect_on_every_rank(tmp_path):
    (start, frozen0, unfrozen0), (_, frozen1, unfrozen1) = values(run_ranks(_freeze, False, folder=tmp_path))
    assert_identical(frozen0, frozen1)
    assert_identical(unfrozen0, unfrozen1)
    body = [k for k in start if k.startswith("layer_groups.0")]
    assert all(torch.equal(frozen0[k], start[k]) for k in body)  # frozen: untouched, bit for bit
    assert not torch.equal(frozen0["layer_groups.1.weight"], start["layer_groups.1.weight"])
    assert not any(torch.equal(unfrozen0[k], frozen0[k]) for k in body)  # unfrozen: it trains, on both
    model = mlp()
    opt = sgd(model)
    freeze(model)
    run(model, global_batches(), 1, opt=opt)
    unfreeze(model)
    assert_close(unfrozen0, run(model, global_batches(), 2, opt=opt, start_step=3)[0], rtol=1e-5, atol=1e-6)


def test_freezing_on_one_rank_only_is_refused_on_both(tmp_path):
    results = run_ranks(_freeze, True, folder=tmp_path)
    for kind, message in results:  # not a crash of one rank and a silent mix on the other
        assert kind == "error" and "gradients to average" in message and "every rank" in message


def _rank0_searches(rank):
    model, calls = mlp(), []
    opt, batches = sgd(model), global_batches()  # the global batch: the one each step averages over

    def sweep():
        calls.append(rank)
        return lr_find(model, batches, opt, num_iter=20)

    def try_step(batch_size):  # a plain loop: fit and evaluate would wait for the other rank
        x, y = blobs(batch_size)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.zero_grad()

    found = run_on_main(sweep)
    size = run_on_main(find_batch_size, try_step, limit=32, model=model, optimizer=opt)
    weights, _ = run(model, Shard(batches), 1, opt=opt)  # lr_find left the model as it was, on both
    return calls, found, size, weights


def test_the_lr_range_test_and_the_batch_size_search_run_on_rank_0_for_all(tmp_path):
    (calls0, found0, size0, weights0), (calls1, found1, size1, weights1) = values(
        run_ranks(_rank0_searches, folder=tmp_path))
    assert calls0 == [0] and calls1 == []
    assert found0 == found1 and found0.suggested_lr is not None and size0 == size1 == 32
    model = mlp()
    alone = lr_find(model, global_batches(), sgd(model), num_iter=20)
    assert found0.lrs == alone.lrs and found0.losses == alone.losses
    assert_identical(weights0, weights1)


# ---- errors: none waits forever ----------------------------------------------------------------

def _rank0_fails(rank, what):
    if what == "raises":
        return run_on_main(lambda: 1 / 0)
    return run_on_main(lambda: (lambda: None))  # a result that cannot be sent


def test_an_error_on_rank_0_inside_run_on_main_reaches_every_rank(tmp_path):
    (kind0, error0), (kind1, error1) = run_ranks(_rank0_fails, "raises", folder=tmp_path / "a", deadline=30)
    assert kind0 == kind1 == "error"
    assert error0.startswith("ZeroDivisionError") and "failed on rank 0: ZeroDivisionError" in error1
    results = run_ranks(_rank0_fails, "unpicklable", folder=tmp_path / "b", deadline=30)
    assert all(kind == "error" and "pickle" in message.lower() for kind, message in results)


def _one_rank_fails(rank, how):
    def augment(x):
        if rank == 1 and augment.calls == 2:
            if how == "raises":
                raise ValueError("rank 1 fails at step 2")
            time.sleep(60)  # a rank that hangs
        augment.calls += 1
        return x
    augment.calls = 0
    started = time.monotonic()
    try:
        run(mlp(), Shard(global_batches()), 3, augment=augment)
    finally:
        if rank == 0:
            assert time.monotonic() - started < 15, "rank 0 waited"


@pytest.mark.parametrize("how", ["raises", "hangs"])
def test_a_rank_that_raises_or_hangs_stops_the_other_with_an_error(how, tmp_path):
    """A rank that dies closes its connections, and the other's next collective fails at once; a
    rank that hangs makes the other's collective fail after setup's timeout (here 3 s)."""
    results = run_ranks(_one_rank_fails, how, folder=tmp_path, timeout=3, deadline=30, may_hang={1})
    assert results[0][0] == "error"
    assert ("by peer" if how == "raises" else "Timed out") in results[0][1]  # closed or reset by peer
    if how == "raises":
        assert results[1] == ("error", "ValueError: rank 1 fails at step 2")


FAILING_SCRIPT = textwrap.dedent("""
    import torch
    from minicnn import distributed
    from minicnn.data import Batches
    from minicnn.train import fit
    me = distributed.setup(timeout=20)
    torch.manual_seed(0)
    x, y = torch.rand(40, 16), torch.randint(0, 2, (40,))
    train = distributed.Shard(Batches(x, y, 8, shuffle=True, generator=torch.Generator().manual_seed(0)))
    model = torch.nn.Linear(16, 2)
    def augment(x):
        augment.calls += 1
        if me.rank == 1 and augment.calls == 3:
            raise ValueError("rank 1 gives up at its third batch")
        return x
    augment.calls = 0
    if distributed.is_main():
        print("rank 0 of", me.world_size, "on", me.device, flush=True)
    fit(model, train, None, torch.optim.SGD(model.parameters(), lr=0.1), lambda step: 0.1, 2, augment=augment,
        verbose=False, after_backward=distributed.average_gradients)
    distributed.teardown()
""")


def test_under_torchrun_a_failing_rank_ends_the_run_with_its_error(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text(FAILING_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    env["PYTHONPATH"] = str(REPO)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode != 0 and time.monotonic() - started < 60
    assert "rank 1 gives up at its third batch" in output and output.count("rank 0 of 2 on cpu") == 1


# ---- helpers under a process group: their checks -----------------------------------------------

def _mismatches(rank):
    errors = {}
    for name, call in [
            ("gather", lambda: gather(torch.zeros(3, 2 + rank))),
            ("broadcast", lambda: distributed.broadcast_weights(nn.Linear(4, 2 + rank))),
            ("shard", lambda: Shard(Batches(*blobs(40), 8, shuffle=True))),  # seed from each rank's own RNG
            ("average", lambda: distributed.average_gradients(*_gradients(rank, layers=1 + rank)))]:
        torch.manual_seed(rank)
        try:
            call()
            errors[name] = None
        except Exception as error:
            errors[name] = f"{type(error).__name__}: {error}"
    return errors


def _gradients(rank, layers=1):
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(layers)], nn.BatchNorm1d(4))
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(rank))
    loss = model(x).pow(2).mean()
    loss.backward()
    return model, 3 + rank, loss.item()


def test_what_must_agree_across_ranks_is_checked_on_every_rank(tmp_path):
    for errors in values(run_ranks(_mismatches, folder=tmp_path)):
        assert errors["gather"].startswith("ValueError: gather") and "dimension" in errors["gather"]
        for name, words in [("broadcast", "broadcast_weights"), ("shard", "seeds"),
                            ("average", "freeze")]:
            assert errors[name].startswith("ValueError") and words in errors[name], errors[name]
            assert "differ across ranks" in errors[name]


def _average_and_fit_without_hooks(rank):
    model, n, loss = _gradients(rank)
    before = {k: v.clone() for k, v in model.state_dict().items()} | {
        f"{k}.grad": p.grad.clone() for k, p in model.named_parameters()}
    mean_loss = distributed.average_gradients(model, n, loss)
    after = model.state_dict() | {f"{k}.grad": p.grad for k, p in model.named_parameters()}
    shares = gather(torch.tensor([[n, loss]], dtype=torch.float64))
    refused = []
    for call in (lambda: fit(mlp(), Shard(global_batches()), None, sgd(mlp()), lambda step: 0.1, 1, verbose=False),
                 lambda: evaluate(mlp(), [blobs(4)])):
        try:
            call()
        except ValueError as error:
            refused.append(str(error))
    return before, after, mean_loss, shares, refused


def test_average_gradients_weighs_each_share_and_fit_without_it_is_refused(tmp_path):
    """Shares of 3 and 4 samples: g = (3 g_0 + 4 g_1) / 7, the global batch's mean gradient, the
    same bits on both ranks. Under torchrun, fit without after_backward (evaluate without all_sum)
    would train (count) each rank alone: both are refused, naming the hook."""
    (before0, ours0, loss0, shares, refused0), (before1, ours1, loss1, _, refused1) = values(
        run_ranks(_average_and_fit_without_hooks, folder=tmp_path))
    assert_identical(ours0, ours1)
    assert loss0 == loss1
    (n0, l0), (n1, l1) = shares.tolist()
    assert loss0 == pytest.approx((n0 * l0 + n1 * l1) / (n0 + n1))
    for k in before0:
        if k.endswith(".grad") or "running" in k:
            torch.testing.assert_close(ours0[k], (n0 * before0[k] + n1 * before1[k]) / (n0 + n1))
    for refused in (refused0, refused1):
        assert len(refused) == 2 and "after_backward" in refused[0] and "all_sum" in refused[1], refused


def test_broadcast_weights_gives_every_rank_rank_0s_model(tmp_path):
    weights = values(run_ranks(lambda rank: distributed.broadcast_weights(mlp(seed=rank)).state_dict(),
                               folder=tmp_path))
    assert_identical(weights[0], weights[1])
    assert_identical(weights[1], mlp(seed=0).state_dict())


# ---- one process: what the helpers do, and what they refuse -------------------------------------

@pytest.fixture
def no_torchrun(monkeypatch):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_without_torchrun_everything_is_one_process(no_torchrun):
    assert distributed.setup() == (0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    assert not torch.distributed.is_initialized() and distributed.is_main()
    t = torch.arange(6.0).view(3, 2)
    assert gather(t) is t and rank_slice(5) == slice(0, 5)
    model, n, loss = _gradients(0)
    grads = [p.grad.clone() for p in model.parameters()]
    assert distributed.average_gradients(model, n, loss) == loss
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))  # untouched, not g * n / n
    assert distributed.broadcast_weights(model) is model
    assert run_on_main(lambda a, b=0: a + b, 1, b=2) == 3
    distributed.teardown()  # nothing to end


def test_shards_cover_every_global_batch_once_in_order():
    batches = global_batches()
    shards = [Shard(batches, rank=r, world_size=3) for r in range(3)]
    assert [len(s) for s in shards] == [len(batches)] * 3
    for epoch, skip in [(0, 0), (1, 0), (2, 1)]:
        whole = list(batches.epoch(epoch, skip=skip))
        parts = [list(s.epoch(epoch, skip=skip)) for s in shards]
        assert len(parts[0]) == len(whole) == 3 - skip
        for i, (x, y) in enumerate(whole):
            assert torch.equal(torch.cat([p[i][0] for p in parts]), x)
            assert torch.equal(torch.cat([p[i][1] for p in parts]), y)
            assert sorted(len(p[i][1]) for p in parts) in ([5, 5, 5], [3, 3, 4])
    lists = [Shard(list(batches.epoch(0)), rank=r, world_size=2) for r in range(2)]  # any loader with len()
    assert torch.equal(torch.cat([next(iter(s))[1] for s in lists]), next(batches.epoch(0))[1])
    unlabelled = Shard(Batches(blobs(40)[0], None, 8, shuffle=False), rank=1, world_size=2)
    assert next(iter(unlabelled))[1] is None
    assert [rank_slice(7, rank=r, world_size=3) for r in range(3)] == [slice(0, 2), slice(2, 4), slice(4, 7)]


def test_bad_input_to_the_helpers_is_refused_by_name():
    batches = global_batches()
    with pytest.raises(ValueError, match=r"rank=2.*world_size"):  # else an empty share, silently
        Shard(batches, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"rank=0.*world_size"):
        rank_slice(10, rank=0, world_size=0)
    with pytest.raises(ValueError, match=r"batch of 4.*8 ranks"):  # seen when the Shard is built
        Shard(Batches(*blobs(40), 4, shuffle=False), rank=0, world_size=8)
    with pytest.raises(ValueError, match=r"batch of 1.*drop_last"):
        Shard(Batches(*blobs(41), 8, shuffle=False), rank=0, world_size=2)  # 41 = 5 x 8 + 1
    Shard(Batches(*blobs(41), 8, shuffle=False, drop_last=True), rank=0, world_size=2)
    short = Shard([blobs(8), blobs(1)], rank=1, world_size=2)  # a list: seen only when read
    with pytest.raises(ValueError, match=r"batch of 1.*2 ranks"):
        list(short.epoch(0))


def test_setup_refuses_a_rank_outside_the_world(no_torchrun):
    """RANK >= WORLD_SIZE: init_process_group would wait, until its timeout, for a missing rank."""
    for name, value in dict(RANK="2", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="29500").items():
        no_torchrun.setenv(name, value)
    with pytest.raises(ValueError, match=r"RANK=2.*WORLD_SIZE"):
        distributed.setup()
    assert not torch.distributed.is_initialized()


def test_setup_refuses_more_processes_than_gpus(no_torchrun):
    for name, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="29500").items():
        no_torchrun.setenv(name, value)
    no_torchrun.setattr(torch.cuda, "is_available", lambda: True)
    no_torchrun.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK=1.*1 GPU.*nproc_per_node"):
        distributed.setup()
