"""The package root hides no module, every concept module has the public names of DESIGN.md's
table, and each module copied into an empty folder with the siblings its docstring names
(minicnn/<name>.py, followed transitively) imports with the rest of minicnn unavailable."""
import ast
import importlib
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

import minicnn

PACKAGE = Path(minicnn.__file__).parent
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
PUBLIC = {
    "data": "Batches normalize train_valid_split stratified_subset",
    "fashion_mnist": "load_fashion_mnist read_idx fashion_mnist_folders download_fashion_mnist",
    "image_folder": "load_image_folder ImageFolder",
    "models": "simple_resnet pretrained_classifier",
    "optim": "SGD",
    "schedule": "sgdr_lr sgdr_lrs cycle_position total_steps cycle_end_steps cosine_lr linear_lr step_decay_lr",
    "lr_find": "lr_find suggest_lr LRFindResult",
    "freeze": "freeze_to freeze unfreeze bn_freeze param_groups differential_lrs",
    "augment": "augment side_on top_down random_affine lighting resize",
    "precompute": "precompute_features body_and_head",
    "train": "fit evaluate predict History accuracy join_histories",
    "tta": "predict_tta",
    "snapshot": "Snapshots predict_each ensemble_predict",
    "diagnose": "diagnose Diagnosis",
    "batch_size": "find_batch_size",
    "checkpoint": "save_checkpoint load_checkpoint atomic_save",
    "atomic": "atomic_write stale_temporaries",
    "speed": "WAYS ways computes_bf16 seconds_per_step fastest",
    "distributed": "setup teardown is_main Shard rank_slice gather average_gradients all_sum broadcast_weights "
                   "run_on_main",
    "export": "export_model load_model",
    "predict": "predict_images main",
    "plots": "save_png plot_lr_find plot_schedule plot_losses plot_augmented plot_confusion plot_top_losses",
}


def test_the_package_root_defines_nothing_but_its_version():
    names = {n for n in vars(minicnn) if not n.startswith("__")} - set(MODULES)
    assert names == set(), f"minicnn/__init__.py defines {sorted(names)}: keep the root empty"
    assert minicnn.__version__


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_names_of_the_design_table(name):
    module = importlib.import_module(f"minicnn.{name}")
    missing = [n for n in PUBLIC[name].split() if not hasattr(module, n)]
    assert not missing, f"minicnn/{name}.py lacks {missing}"


def _minicnn_imports(tree):
    """The minicnn modules a file imports (relative imports count as minicnn ones)."""
    needed = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                needed.add(node.module or "?relative")
            elif (node.module or "").split(".")[0] == "minicnn":
                parts = node.module.split(".")
                needed |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            needed |= {a.name.split(".")[1] for a in node.names if a.name.startswith("minicnn.")}
    return needed


BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    allowed, folder, name = set(sys.argv[1].split(",")) - {""}, sys.argv[2], sys.argv[3]
    class NoMinicnn(importlib.abc.MetaPathFinder):  # the installed minicnn is not there
        def find_spec(self, fullname, path, target=None):
            if fullname.split(".")[0] == "minicnn" and fullname not in allowed:
                raise ImportError(f"{fullname} is not available to a module copied alone")
    sys.meta_path.insert(0, NoMinicnn())
    sys.path.insert(0, folder)
    __import__(name)
""")


def _siblings(name):
    """The minicnn modules `name` needs, transitively: each import of a sibling must be named in the
    importing module's docstring as minicnn/<sibling>.py."""
    needed, todo = set(), [name]
    while todo:
        current = todo.pop()
        tree = ast.parse((PACKAGE / f"{current}.py").read_text())
        docstring = ast.get_docstring(tree) or ""
        assert docstring, f"minicnn/{current}.py has no module docstring"
        for other in _minicnn_imports(tree) - needed - {name}:
            assert f"minicnn/{other}.py" in docstring, \
                f"minicnn/{current}.py imports minicnn.{other}; its docstring must say it needs minicnn/{other}.py"
            needed.add(other)
            todo.append(other)
    return needed


@pytest.mark.parametrize("name", MODULES)
def test_each_module_copied_with_its_named_siblings_imports_without_minicnn(name, tmp_path):
    needed = _siblings(name)
    (tmp_path / f"{name}.py").write_text((PACKAGE / f"{name}.py").read_text())
    if needed:
        (tmp_path / "minicnn").mkdir()
        (tmp_path / "minicnn" / "__init__.py").write_text("")
        for other in needed:
            (tmp_path / "minicnn" / f"{other}.py").write_text((PACKAGE / f"{other}.py").read_text())
    allowed = ",".join(["minicnn"] + [f"minicnn.{other}" for other in needed]) if needed else ""
    result = subprocess.run([sys.executable, "-c", BLOCKER, allowed, str(tmp_path), name],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, f"minicnn/{name}.py copied with {sorted(needed)} does not import:\n{result.stderr[-2000:]}"


def test_the_copy_test_catches_a_module_that_needs_an_unnamed_one(tmp_path):
    tree = ast.parse('"""Uses the loop."""\nfrom minicnn.train import fit\nimport minicnn.data\n')
    assert _minicnn_imports(tree) == {"train", "data"}
    (tmp_path / "copied.py").write_text("from minicnn.train import fit\n")
    result = subprocess.run([sys.executable, "-c", BLOCKER, "", str(tmp_path), "copied"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0 and "not available to a module copied alone" in result.stderr
