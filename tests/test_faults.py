"""Faults while saving. A process saving checkpoints (or snapshots) in a loop is killed with SIGKILL,
25 times each, at random moments and inside the write; a save runs out of space (a file-size limit,
as on a full disk). After each fault the previous file loads with the values it was saved with, the
saved step never goes back, and no temporary file outlives the next good save.

One child process imports torch once and runs every trial; each trial forks a grandchild that saves
until the child kills it, so a trial costs milliseconds, not an interpreter start."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork, SIGKILL and resource limits (POSIX)")

KILLS = 25

CHILD = textwrap.dedent(r'''
    import errno, json, os, random, resource, select, signal, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)  # before any torch op: no thread pool exists when the grandchildren fork
    from torch import nn
    from minicnn.checkpoint import load_checkpoint, save_checkpoint
    from minicnn.snapshot import Snapshots

    root, kills, rng = Path(sys.argv[1]), int(sys.argv[2]), random.Random(int(sys.argv[3]))

    def filled(value, size):
        model = nn.Linear(size, size)
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(value)
        return model

    class CheckpointRun:  # a training loop that saves after step k
        folder, path = root / "checkpoint", root / "checkpoint" / "ckpt.pt"
        def __init__(self):
            self.k = 0
        def save(self):
            model = filled(self.k, 128)  # 66 KB of weights, all equal to the step
            save_checkpoint(self.path, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), step=self.k)
        def advance(self):
            self.k += 1
        def check(self):  # -> (the step found, its values are that step's)
            model = filled(-1.0, 128)
            step = load_checkpoint(self.path, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)).step
            self.k = step
            return step, all(bool((p == step).all()) for p in model.parameters())

    class SnapshotRun:  # a run that takes a snapshot at each cycle's end and saves the latest two
        folder = root / "snapshots"
        def __init__(self):
            self.snaps = Snapshots(keep=2)
            self.advance()
        def save(self):
            self.snaps.save(self.folder)
        def advance(self):  # the next cycle's snapshot: weights all equal to the cycle, taken at step 10 * cycle
            cycle = self.snaps.calls
            self.snaps(filled(cycle, 48), 10 * cycle)
        def check(self):
            loaded = Snapshots.load(self.folder)
            ok = loaded.cycles == list(range(len(loaded))) and loaded.steps == [10 * c for c in loaded.cycles]
            ok = ok and all(bool((t == c).all()) for s, c in zip(loaded.states, loaded.cycles) for t in s.values())
            self.snaps = Snapshots.load(self.folder, keep=2)  # go on from what is on disk, as a resumed run would
            return len(loaded), ok

    def temporaries(folder):
        return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))

    def read(fd, timeout=20):
        if not select.select([fd], [], [], timeout)[0]:
            raise TimeoutError("the grandchild said nothing for 20 s")
        return os.read(fd, 1)

    def trial(run, pause, in_write):
        """Fork a grandchild that saves in a loop; kill it `pause` s into its m-th save (with `in_write`, as
        soon as that save's temporary file exists, so the kill lands mid-write on any machine); check."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the grandchild: save, advance, save ... until killed
            os.close(r)
            try:
                while True:
                    os.write(w, b"s")  # a save begins
                    run.save()
                    os.write(w, b"d")  # ... and is done
                    run.advance()
            finally:
                os._exit(1)
        os.close(w)
        m, said = rng.randint(1, 3), b""
        while said.count(b"s") < m:  # wait until the m-th save has begun
            said += read(r)
        waited = time.perf_counter()
        while in_write and not temporaries(run.folder) and time.perf_counter() - waited < 20:
            time.sleep(0.0001)
        time.sleep(pause)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)  # reaped: its pid is free, so the next save knows its temporary is stale
        while chunk := os.read(r, 4096):
            said += chunk
        os.close(r)
        left = temporaries(run.folder)
        try:
            value, ok = run.check()
            error = None
        except Exception as e:
            value, ok, error = None, False, f"{type(e).__name__}: {e}"
        if error is None:
            run.save()  # the next good save, in this process
        return {"left": left, "value": value, "ok": ok, "error": error, "completed": said.count(b"d"),
                "after": temporaries(run.folder)}

    def disk_full(run):
        """A grandchild whose files may not exceed half the size of the last one saved: its save fails."""
        limit = max(p.stat().st_size for p in run.folder.iterdir() if not p.name.startswith(".")) // 2
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            try:
                run.advance()
                run.save()
            except OSError as e:
                os._exit(0 if e.errno == errno.EFBIG and "was not written" in str(e) else 3)
            except BaseException:
                os._exit(4)
            os._exit(2)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        left = temporaries(run.folder)
        value, ok = run.check()
        return {"status": status, "left": left, "value": value, "ok": ok}

    results = {}
    for name, run in (("checkpoint", CheckpointRun()), ("snapshot", SnapshotRun())):
        run.folder.mkdir(parents=True)
        run.save()  # the first good file
        started = time.perf_counter()
        run.save()  # again, now that everything is imported: how long a save takes
        took = min(time.perf_counter() - started, 0.2)
        before = run.check()[0]
        trials = [trial(run, rng.uniform(0, 1.5 * took), False) if i % 2 else trial(run, 0.0, True)
                  for i in range(kills)]  # half at random moments, half inside the write
        results[name] = {"before": before, "trials": trials, "disk_full": disk_full(run)}
    print(json.dumps(results))
''')


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    result = subprocess.run([sys.executable, "-c", CHILD, str(root), str(KILLS), "0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("what", ["checkpoint", "snapshot"])
def test_after_each_sigkill_the_previous_file_loads_and_no_temporary_piles_up(faults, what):
    trials = faults[what]["trials"]
    assert len(trials) == KILLS
    assert [t["error"] for t in trials] == [None] * KILLS  # every kill left a file that loads ...
    assert all(t["ok"] for t in trials)  # ... with the values it was saved with
    values = [faults[what]["before"]] + [t["value"] for t in trials]
    assert values == sorted(values)  # the saved step (the number of cycles) never went back
    assert all(len(t["left"]) <= 1 for t in trials)  # at most the killed save's own temporary ...
    assert all(t["after"] == [] for t in trials)  # ... and the next good save removed it
    # the kills did land inside saves (a temporary left behind), and saves between kills did complete
    assert sum(bool(t["left"]) for t in trials) >= 3 and sum(t["completed"] for t in trials) >= 3


@pytest.mark.parametrize("what", ["checkpoint", "snapshot"])
def test_a_save_that_runs_out_of_space_fails_and_leaves_the_previous_file(faults, what):
    full = faults[what]["disk_full"]
    assert full["status"] == 0  # the save raised OSError(EFBIG) naming the file
    assert full["ok"] and full["value"] == faults[what]["trials"][-1]["value"]  # the file before it, unchanged
    assert full["left"] == []  # its temporary was removed by the failed save itself
