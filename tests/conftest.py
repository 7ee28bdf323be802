"""Shared test set-up: a hypothesis profile for CI, one CPU thread, fixed seeds.

CI runs on a noisy 2-core machine: hypothesis is derandomized (the same examples every
run) and has no deadline, since a torch call can take a while when the machine is busy.
"""
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from minicnn.fashion_mnist import fashion_mnist_folders

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=30,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tests that read the real Fashion-MNIST files (make test installs them; a bare checkout skips).
HAVE_DATA = any((Path(f) / name).is_file() for f in fashion_mnist_folders()
                for name in ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"))
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST not installed "
                                "(make test installs it)")



def blobs(n, seed=0):
    """n images of two classes, 1x4x4: bright in the top half (0) or in the bottom half (1)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 1, 4, 4, generator=g) * 0.3
    x[y == 0, :, :2] += 0.6
    x[y == 1, :, 2:] += 0.6
    return x, y


# Tiny tensors are faster on one thread, and several test runs may share the machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(items):
    """The slow tests (whole lessons) first: with one worker per core (make test's -n auto) the
    long runs start at once and the many short tests fill in around them, instead of one long
    run left alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
