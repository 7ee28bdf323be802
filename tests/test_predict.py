"""minicnn.predict: a tiny model trained on a tiny image folder, exported, predicts the same
probabilities as the lesson's own predict on the same images (loaded by load_image_folder),
through predict_images and through the command line; broken images are named and skipped, and
bad arguments are refused before any work."""
import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minicnn.data import Batches
from minicnn.export import export_model, load_model
from minicnn.image_folder import load_image_folder
from minicnn.models import simple_resnet
from minicnn.predict import images_in, main, predict_images
from minicnn.train import fit, predict
from minicnn.tta import predict_tta

ROOT = Path(__file__).resolve().parents[1]
SIZE = 12
COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}  # class: its colour


def write_image(path, colour, kind, rng):
    """A noisy image of one colour, in one of the PNG kinds load_image_folder reads."""
    h, w = (16, 12) if rng.random() < 0.5 else (12, 18)  # not square: resized, then cropped
    rgb = np.clip(np.array(colour) * 0.7 + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb)
    if kind == "grey":
        image = image.convert("L")
    elif kind == "rgba":
        image = image.convert("RGBA")
    elif kind == "palette":
        image = image.convert("P")
    elif kind == "16-bit":  # grey, 16 bits a pixel ("I;16")
        image = Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A folder of 3 classes (every PNG kind among its test images), a simple_resnet trained on
    it for a few steps, and its model.pt -> dict(root, folder, model, path)."""
    root, rng = tmp_path_factory.mktemp("images"), np.random.default_rng(0)
    kinds = ["rgb", "grey", "rgba", "palette", "16-bit"]
    for split, n in (("train", 8), ("valid", 5)):
        for name, colour in COLOURS.items():
            for i in range(n):
                kind = kinds[i % len(kinds)] if split == "valid" else "rgb"
                write_image(root / split / name / f"{i}.png", colour, kind, rng)
    folder = load_image_folder(root, SIZE)
    torch.manual_seed(0)
    model = simple_resnet(3, 3, (4, 8))
    train = Batches(*folder.train, 8, shuffle=True, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    fit(model, train, None, opt, lambda step: 0.05, 3, verbose=False)
    path = export_model(root / "model.pt", model, arch="simple_resnet",
                        arch_kwargs={"widths": (4, 8)}, classes=folder.classes, size=SIZE,
                        channels=3, preset="side_on", test_accuracy=0.5)
    return dict(root=root, folder=folder, model=model.eval(), path=path)


def lessons_predictions(trained):
    """What the lesson predicts for valid/: train.predict on load_image_folder's tensors."""
    return predict(trained["model"], Batches(trained["folder"].valid[0], None, 64, shuffle=False))


def valid_paths(trained):
    """valid/'s images in load_image_folder's order: classes sorted, then files sorted."""
    return [p for c in trained["folder"].classes
            for p in sorted((trained["root"] / "valid" / c).iterdir())]


def test_predict_images_gives_the_lessons_predictions(trained):
    model, info = load_model(trained["path"])
    paths = valid_paths(trained)
    assert images_in(trained["root"] / "valid") == paths
    assert {Image.open(p).mode for p in paths} == {"RGB", "L", "RGBA", "P", "I;16"}
    probs, read, failures = predict_images(model, info, paths, batch_size=4, device="cpu")
    assert read == paths and failures == []
    torch.testing.assert_close(probs, lessons_predictions(trained))
    # not a degenerate model: it tells the colours apart
    assert (probs.argmax(1) == trained["folder"].valid[1]).float().mean() > 0.5


def test_tta_is_the_lessons_tta_and_repeats(trained):
    model, info = load_model(trained["path"])
    paths = valid_paths(trained)
    x = trained["folder"].valid[0].float() / 255
    expected = predict_tta(trained["model"], [(x, None)], augment="side_on", n_aug=4,
                           generator=torch.Generator().manual_seed(0))
    first = predict_images(model, info, paths, tta=True)[0]
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(predict_images(model, info, paths, tta=True)[0], first)
    assert not torch.allclose(first, predict_images(model, info, paths)[0])


def test_a_grey_model_sees_the_images_in_grey(trained, tmp_path):
    model = simple_resnet(3, 1, (4, 8)).eval()
    path = export_model(tmp_path / "grey.pt", model, arch="simple_resnet",
                        arch_kwargs={"widths": (4, 8)}, classes=["a", "b", "c"], size=SIZE,
                        channels=1)
    rgb = trained["folder"].valid[0].float()  # (N, 3, SIZE, SIZE)
    grey = (0.299 * rgb[:, :1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:]).round().byte()
    probs = predict_images(*load_model(path), valid_paths(trained))[0]
    torch.testing.assert_close(probs, predict(model, Batches(grey, None, 64, shuffle=False)))


def test_the_command_line_writes_the_lessons_predictions_and_skips_a_broken_image(trained,
                                                                                  tmp_path):
    shutil.copytree(trained["root"] / "valid", tmp_path / "new")
    (tmp_path / "new" / "green" / "broken.png").write_text("not an image")
    (tmp_path / "new" / "notes.txt").write_text("not an image either, and not one by its name")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "minicnn.predict", str(trained["path"]), "new",
                             "--top", "2", "--device", "cpu"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "skipped 1 image(s)" in result.stderr and "broken.png" in result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 15 and all(line.count(", ") == 1 for line in lines)  # --top 2
    with open(tmp_path / "predictions.csv", newline="") as f:  # the default CSV
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "prediction", "probability", "blue", "green", "red"]
    assert [row[0] for row in rows[1:]] == [str("new" / p.relative_to(trained["root"] / "valid"))
                                            for p in valid_paths(trained)]
    from_csv = torch.tensor([[float(v) for v in row[3:]] for row in rows[1:]])
    torch.testing.assert_close(from_csv, lessons_predictions(trained), atol=1e-6, rtol=0)


def test_top_and_csv_for_single_files(trained, tmp_path, capsys):
    paths = valid_paths(trained)[:2]
    main([str(trained["path"]), *map(str, paths), "--top", "1", "--csv",
          str(tmp_path / "out" / "p.csv"), "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in lines] == list(map(str, paths))
    assert all(", " not in line.split(": ")[1] for line in lines)  # one class each
    assert len((tmp_path / "out" / "p.csv").read_text().splitlines()) == 3


@pytest.mark.parametrize("kwargs, match", [(dict(batch_size=0), "batch_size=0"),
                                           (dict(batch_size=-1), "batch_size=-1"),  # no batch
                                           (dict(tta=True), "tta=True")])
def test_predict_images_refuses_bad_arguments(trained, kwargs, match):
    model, info = load_model(trained["path"])
    info = {**info, "preset": None} if "tta" in kwargs else info
    with pytest.raises(ValueError, match=match):
        predict_images(model, info, valid_paths(trained), **kwargs)


def test_a_folder_of_only_broken_images_exits_1(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_text("text")
    (tmp_path / "bad" / "b.jpg").write_bytes(b"")
    with pytest.raises(SystemExit, match="none of the 2 image.s. could be read"):
        main([str(trained["path"]), str(tmp_path / "bad"), "--device", "cpu"])
    assert "a.png" in capsys.readouterr().err
    assert not (tmp_path / "predictions.csv").exists()


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/nothing.pt", "{image}"], "argument model: .*nothing.pt"),
    (["{tmp}", "{image}"], "argument model: .*model.pt"),  # a folder: its model.pt
    (["{tmp}/damaged.pt", "{image}"], "argument model: .*damaged.pt .*damaged"),
    (["{model}", "{tmp}/nowhere.png"], "argument IMAGE_OR_FOLDER: no such file or folder"),
    (["{model}", "{image}", "--top", "0"], "argument --top: must be >= 1, got 0"),
    (["{model}", "{image}", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (["{model}", "{image}", "--csv", "{tmp}"], "argument --csv: .* is a folder"),
    (["{model}", "{image}", "--csv", "{image}/p.csv"], "argument --csv: .* is a file, not a"),
    (["{model}", "{image}", "--device", "gpu"], "argument --device: .*'gpu'"),
    (["{model}", "{image}", "--device", "cuda:7"], "argument --device: .*'cuda:7'"),
    (["{plain}", "{image}", "--tta"], "argument --tta: this model was exported without"),
    pytest.param(["{model}", "{image}", "--device", "cuda"], "argument --device: .*'cuda'",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
])
def test_bad_arguments_are_refused_by_name(trained, tmp_path, capsys, argv, message):
    data = bytearray(trained["path"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "damaged.pt").write_bytes(bytes(data))
    plain = export_model(tmp_path / "plain.pt", trained["model"], arch="simple_resnet",
                         arch_kwargs={"widths": (4, 8)}, classes=["a", "b", "c"], size=SIZE,
                         channels=3)
    names = dict(tmp=tmp_path, model=trained["path"], plain=plain,
                 image=valid_paths(trained)[0])
    with pytest.raises(SystemExit) as exit_:
        main([arg.format(**names) for arg in argv])
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err)
