"""export_model / load_model: a round trip gives the same outputs bit for bit, rebuilding needs
no pretrained weights, and every file that is not a model this minicnn reads is refused by
name before anything is built."""
import pytest
import torch

import minicnn.efficientnet as efficientnet
from minicnn.checkpoint import save_checked, save_checkpoint
from minicnn.export import FORMAT, export_model, load_model
from minicnn.models import pretrained_classifier, simple_resnet

CLASSES = ["cat", "dog", "fox"]


def tiny(channels=3):
    model = simple_resnet(3, channels, (4, 8))
    # random BN statistics and weights (bn2's start at 0); Normalize, layer_groups.0.0, kept
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if value.is_floating_point() and not name.startswith("layer_groups.0.0."):
                value.copy_(torch.randn_like(value).abs() + 0.1 if "running_var" in name
                            else torch.randn_like(value))
    return model.eval()


def export(path, model=None, **changes):
    settings = dict(arch="simple_resnet", arch_kwargs={"widths": (4, 8)}, classes=CLASSES,
                    size=16, channels=3, preset="side_on", test_accuracy=0.75)
    return export_model(path, tiny() if model is None else model, **{**settings, **changes})


def test_round_trip_gives_the_same_outputs_and_info(tmp_path):
    model, x = tiny(), torch.rand(5, 3, 16, 16)
    assert export(tmp_path / "model.pt", model) == tmp_path / "model.pt"
    loaded, info = load_model(tmp_path / "model.pt")
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert info["classes"] == CLASSES and info["size"] == 16 and info["channels"] == 3
    assert info["arch"] == "simple_resnet" and info["arch_kwargs"] == {"widths": (4, 8)}
    assert info["preset"] == "side_on" and info["test_accuracy"] == 0.75
    assert info["input"] == "x = pixels / 255"  # then the model normalises: ImageNet's
    assert info["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert info["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left


def test_a_channels_last_model_is_saved_as_cpu_tensors_and_loads_back(tmp_path):
    model = tiny(channels=1).to(memory_format=torch.channels_last)
    export(tmp_path / "model.pt", model, channels=1)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)["contents"]["weights"]
    assert all(t.device.type == "cpu" for t in saved.values())
    loaded, _ = load_model(tmp_path / "model.pt")
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def _no_download(*args, **kwargs):
    raise AssertionError("load_model must not read or download pretrained weights")


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet18"])
def test_loading_needs_no_pretrained_weights(arch, tmp_path, monkeypatch):
    import torchvision
    model = pretrained_classifier(arch, 2, pretrained=False, in_channels=1).eval()
    monkeypatch.setattr(efficientnet, "weights_path", _no_download)
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", _no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    export_model(tmp_path / "model.pt", model, arch=arch, arch_kwargs={}, classes=["a", "b"],
                 size=32, channels=1)
    loaded, info = load_model(tmp_path / "model.pt")
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert info["preset"] is None and info["test_accuracy"] is None
    grey_mean = 127 / 255 if arch == "efficientnet_lite0" else (0.485 + 0.456 + 0.406) / 3
    assert info["mean"] == pytest.approx([grey_mean])  # what the grey stem computes inside


def test_refuses_a_missing_file_and_a_folder_means_its_model_pt(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_model(tmp_path / "nothing.pt")
    with pytest.raises(FileNotFoundError, match="model.pt"):  # an empty folder: no model.pt in it
        load_model(tmp_path)
    export(tmp_path / "model.pt")
    assert load_model(tmp_path)[1]["classes"] == CLASSES  # fastai's load_learner(folder) too


def test_refuses_a_damaged_file(tmp_path):
    path = export(tmp_path / "model.pt")
    data = bytearray(path.read_bytes())
    weights = torch.load(path, weights_only=True)["contents"]["weights"]
    # the bytes of the last layer's weight, found in the file: flip one of them
    raw = weights["layer_groups.2.2.weight"].numpy().tobytes()
    where = data.find(raw)
    assert where > 0
    data[where + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.pt.*damaged"):
        load_model(path)
    path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(ValueError, match="model.pt.*damaged"):
        load_model(path)


def test_refuses_foreign_files_saying_what_they_are(tmp_path):
    model = tiny()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="weights.pt holds bare weights"):
        load_model(tmp_path / "weights.pt")
    save_checked(tmp_path / "body.pt", "minicnn-lesson2-body-1", dict(model.state_dict()))
    with pytest.raises(ValueError, match="body.pt is lesson2's cache"):
        load_model(tmp_path / "body.pt")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path / "ckpt.pt", model=model, optimizer=opt, step=0)
    with pytest.raises(ValueError, match="ckpt.pt is a training checkpoint"):
        load_model(tmp_path / "ckpt.pt")
    (tmp_path / "notes.pt").write_text("not a model")
    with pytest.raises(ValueError, match="notes.pt"):
        load_model(tmp_path / "notes.pt")


def _contents(tmp_path):
    return torch.load(export(tmp_path / "model.pt"), weights_only=True)["contents"]


def test_refuses_a_newer_format_and_an_unknown_architecture(tmp_path):
    contents = _contents(tmp_path)
    save_checked(tmp_path / "newer.pt", "minicnn-model-2", contents)
    with pytest.raises(ValueError, match="newer.pt .*newer minicnn.*upgrade"):
        load_model(tmp_path / "newer.pt")
    save_checked(tmp_path / "vgg.pt", FORMAT, {**contents, "arch": "vgg16"})
    with pytest.raises(ValueError, match="vgg16"):
        load_model(tmp_path / "vgg.pt")


@pytest.mark.parametrize("changes, message", [
    (dict(arch="vgg16"), "vgg16"),
    (dict(arch_kwargs={"widths": (4, 16)}), "not this model"),
    (dict(arch_kwargs={"widths": (4, 8, 16)}), "not this model"),
    (dict(channels=1), "not this model"),  # a 3-channel model: the stem's shape differs
    (dict(channels=2), "channel"),  # no builder takes 2
    (dict(classes=["cat"]), "n_classes=1"),
    (dict(size=0), "size=0"),
    (dict(size=16.0), "size=16.0"),  # minicnn.predict would resize to a float
    (dict(preset="sideways"), "preset='sideways'"),
])
def test_export_refuses_bad_arguments_before_writing(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        export(tmp_path / "model.pt", **changes)
    assert list(tmp_path.iterdir()) == []


def test_exporting_moves_no_random_number(tmp_path):
    """export_model builds the architecture to compare it with the model: a lesson that draws
    random numbers after exporting must draw the ones it would have drawn without."""
    model = simple_resnet(3, 1, (4, 8))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    export_model(tmp_path / "model.pt", model, arch="simple_resnet", arch_kwargs={"widths": (4, 8)},
                 classes=["a", "b", "c"], size=8, channels=1)
    assert torch.equal(torch.get_rng_state(), state)
