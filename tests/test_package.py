"""The package re-exports the public names of DESIGN.md's module table, and each concept module
imports no other minicnn module unless its docstring names it (so it can be copied alone)."""
import ast
from pathlib import Path

import minicnn

PUBLIC = """load_fashion_mnist load_image_folder batches normalize simple_resnet pretrained_classifier
SGD sgdr_lr cycle_position total_steps cosine_lr linear_lr step_decay_lr set_lrs lr_find suggest_lr
LRFindResult freeze_to freeze unfreeze bn_freeze param_groups discriminative_lrs augment side_on top_down
random_affine lighting resize precompute_features fit evaluate predict History predict_tta Snapshots
ensemble_predict diagnose Diagnosis find_batch_size save_checkpoint load_checkpoint""".split()


def test_public_names_are_exported():
    missing = [name for name in PUBLIC if not hasattr(minicnn, name)]
    assert not missing and minicnn.__version__


def test_concept_modules_are_copyable_alone():
    for path in sorted(Path(minicnn.__file__).parent.glob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        docstring = ast.get_docstring(tree) or ""
        assert docstring, f"{path.name} has no module docstring"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minicnn"):
                needed = node.module.split(".")[-1]
                assert needed in docstring, f"{path.name} imports {node.module} but its docstring does not say so"
