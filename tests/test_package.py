"""The package root hides no module, every concept module has the public names of DESIGN.md's
table, and each module copied into an empty folder with the siblings its docstring names
(minicnn/<name>.py, followed transitively) imports with the rest of minicnn unavailable."""
import ast
import importlib
import io
import json
import re
import subprocess
import sys
import textwrap
import tokenize
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
    "whitening": "whiten_ sample_patches simple_resnet_stem",
    "ema": "EMA decay_at",
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
    # argv[1]: JSON [[allowed minicnn modules, folder, module name], ...]; one import each, in turn
    import importlib.abc, json, sys, traceback
    allowed = set()
    class NoMinicnn(importlib.abc.MetaPathFinder):  # the installed minicnn is not there
        def find_spec(self, fullname, path, target=None):
            if fullname.split(".")[0] == "minicnn" and fullname not in allowed:
                raise ImportError(f"{fullname} is not available to a module copied alone")
    sys.meta_path.insert(0, NoMinicnn())
    failed = []
    for names, folder, name in json.loads(sys.argv[1]):
        allowed = set(names)
        sys.path.insert(0, folder)
        try:
            __import__(name)
        except Exception:
            failed.append(f"{name}: " + traceback.format_exc(limit=-3))
        sys.path.remove(folder)  # the next copy starts with no minicnn module imported
        for module in [m for m in sys.modules if m == name or m.split(".")[0] == "minicnn"]:
            del sys.modules[module]
    sys.exit("\\n".join(failed) or None)
""")


def _copy_alone(copies):
    """Import each (name, folder, allowed) copy in one fresh process -> its exit status and stderr."""
    result = subprocess.run([sys.executable, "-c", BLOCKER,
                             json.dumps([[sorted(allowed), str(folder), name]
                                         for name, folder, allowed in copies])],
                            capture_output=True, text=True, timeout=300)
    return result.returncode, result.stderr


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


def test_each_module_copied_with_its_named_siblings_imports_without_minicnn(tmp_path):
    copies = []
    for name in MODULES:
        needed, folder = _siblings(name), tmp_path / name
        folder.mkdir()
        (folder / f"{name}.py").write_text((PACKAGE / f"{name}.py").read_text())
        if needed:
            (folder / "minicnn").mkdir()
            (folder / "minicnn" / "__init__.py").write_text("")
            for other in needed:
                (folder / "minicnn" / f"{other}.py").write_text((PACKAGE / f"{other}.py").read_text())
        allowed = {"minicnn"} | {f"minicnn.{other}" for other in needed} if needed else set()
        copies.append((name, folder, allowed))
    status, errors = _copy_alone(copies)
    assert status == 0, f"copied with the siblings their docstrings name, these do not import:\n{errors[-4000:]}"


def test_the_copy_test_catches_a_module_that_needs_an_unnamed_one(tmp_path):
    tree = ast.parse('"""Uses the loop."""\nfrom minicnn.train import fit\nimport minicnn.data\n')
    assert _minicnn_imports(tree) == {"train", "data"}
    (tmp_path / "copied.py").write_text("from minicnn.train import fit\n")
    (tmp_path / "fine.py").write_text("import math\n")
    status, errors = _copy_alone([("fine", tmp_path, set()), ("copied", tmp_path, set())])
    assert status != 0 and "copied: " in errors and "not available to a module copied alone" in errors
    assert "fine: " not in errors


# ---- a module a learner reads in one sitting: <= 200 lines, checks <= 15% of the code -------------

CHECK_NAME = re.compile(r"(^|_)(check|checks|raise|validate)(_|$)")


def _code_and_check_lines(path):
    """Code lines (not blank, comment or docstring) and those of them that are checks: raise and
    assert statements, `if ...: raise` blocks, except blocks that raise, and functions named
    check/raise (a *_checks.py module counts whole)."""
    source = path.read_text()
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and body and isinstance(
                body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    code = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                              tokenize.DEDENT, tokenize.ENDMARKER):
            code.update(set(range(token.start[0], token.end[0] + 1)) - docstrings)
    if path.stem.endswith("checks"):
        return code, code
    checks = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        last = body[-1] if isinstance(body, list) and body else None
        if (isinstance(node, (ast.Raise, ast.Assert))
                or isinstance(node, ast.If) and not node.orelse and isinstance(last, ast.Raise)
                or isinstance(node, ast.ExceptHandler) and isinstance(last, ast.Raise)
                or isinstance(node, ast.FunctionDef) and CHECK_NAME.search(node.name)):
            checks.update(range(node.lineno, node.end_lineno + 1))
    return code, checks & code


def test_every_module_is_at_most_200_lines_and_checks_are_at_most_15_percent_of_the_code():
    lengths = {name: len((PACKAGE / f"{name}.py").read_text().splitlines()) for name in MODULES}
    assert max(lengths.values()) <= 200, {n: k for n, k in lengths.items() if k > 200}
    counts = [_code_and_check_lines(PACKAGE / f"{name}.py") for name in MODULES]
    code, checks = (sum(len(c[i]) for c in counts) for i in (0, 1))
    assert checks <= 0.15 * code, f"{checks} of {code} code lines are checks ({checks / code:.1%})"


def test_the_check_counter_counts_checks_and_not_docstrings(tmp_path):
    (tmp_path / "m.py").write_text('"""Doc.\n\nraise here is words."""\nimport math\n\n\n'
                                   'def f(x):\n    # a comment\n    if x < 0:\n'
                                   '        raise ValueError(\n            "x < 0")\n'
                                   '    return math.sqrt(x)\n')
    code, checks = _code_and_check_lines(tmp_path / "m.py")
    assert sorted(code) == [4, 7, 9, 10, 11, 12] and sorted(checks) == [9, 10, 11]
