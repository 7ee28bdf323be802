"""precompute.py: features equal the frozen body's output, the cache hits and misses, the head trained
on features predicts in the full model as it did on features."""
import pytest
import torch
from torch import nn

from minicnn.data import Batches
from minicnn.freeze import freeze, param_groups
from minicnn.models import GroupedModel, fastai_head, simple_resnet
from minicnn.precompute import body_and_head, precompute_features
from minicnn.train import fit, predict


def tiny_model():
    """simple_resnet's body with fastai's head (concat pool, BN, dropout, ...): 2 x 8 features."""
    early, late, _ = simple_resnet(3, in_channels=1, widths=(4, 8)).layer_groups
    return GroupedModel(early, late, fastai_head(8, 3, hidden=16))


def tiny_images(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8), torch.randint(0, 3, (n,), generator=g)


class CountingBody(nn.Module):
    """Wraps a body and counts the images it sees, to tell a cache hit from a miss."""

    def __init__(self, body):
        super().__init__()
        self.body, self.seen = body, 0

    def forward(self, x):
        self.seen += len(x)
        return self.body(x)


def test_features_are_the_eval_mode_body_output_and_the_mode_is_restored():
    model = tiny_model()
    model.train()
    model(tiny_images()[0].float() / 255)  # move the BN statistics away from their initial values
    body, _ = body_and_head(model)
    x, _ = tiny_images()
    features = precompute_features(body, x, batch_size=7)  # 7 does not divide 20: a last short batch
    assert body.training
    body.eval()
    with torch.no_grad():
        expected = body(x.float() / 255)
    assert features.shape == (20, 16) and features.dtype == torch.float32
    torch.testing.assert_close(features, expected)
    torch.testing.assert_close(precompute_features(body, x.float() / 255, batch_size=20), expected)


def test_cache_hit_reuses_and_any_key_change_misses(tmp_path):
    body = CountingBody(body_and_head(tiny_model())[0])
    x, _ = tiny_images()
    first = precompute_features(body, x, batch_size=8, cache=tmp_path, arch="tiny")
    assert body.seen == 20 and len(list(tmp_path.glob("tiny-8x8-*.pt"))) == 1
    again = precompute_features(body, x, batch_size=8, cache=tmp_path, arch="tiny")
    assert body.seen == 20  # a hit: the body did not run
    assert torch.equal(first, again)

    changed = x.clone()
    changed[3, 0, 4, 4] ^= 1  # one pixel, one bit
    precompute_features(body, changed, batch_size=8, cache=tmp_path, arch="tiny")
    assert body.seen == 40
    precompute_features(body, x, batch_size=8, cache=tmp_path, arch="other")
    assert body.seen == 60
    bigger = torch.nn.functional.interpolate(x.float(), size=(12, 12)).to(torch.uint8)
    precompute_features(body, bigger, batch_size=8, cache=tmp_path, arch="tiny")
    assert body.seen == 80 and len(list(tmp_path.glob("tiny-12x12-*.pt"))) == 1
    with torch.no_grad():
        next(body.parameters()).add_(0.01)  # other weights: the old features would be stale
    precompute_features(body, x, batch_size=8, cache=tmp_path, arch="tiny")
    assert body.seen == 100
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_head_trained_on_features_predicts_the_same_inside_the_full_model():
    torch.manual_seed(0)
    model = tiny_model()
    freeze(model, train_bn=False)
    body, head = body_and_head(model)
    x, _ = tiny_images(32)
    brightness = x.float().mean(dim=(1, 2, 3))
    y = (brightness > brightness.quantile(1 / 3)).long() + (brightness > brightness.quantile(2 / 3)).long()
    features = precompute_features(body, x, batch_size=16)
    train = Batches(features, y, 8, shuffle=True, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(head.parameters(), lr=0.05, momentum=0.9)
    before = [p.detach().clone() for p in model.layer_groups[2].parameters()]
    history = fit(head, train, None, opt, lambda step: 0.05, 5, verbose=False)
    assert history.train_loss[-1] < 0.9 * history.train_loss[0]  # it learns (labels: brightness terciles)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.layer_groups[2].parameters()))

    on_features = predict(head, Batches(features, y, 10, shuffle=False))
    on_images = predict(model, Batches(x, y, 10, shuffle=False))
    torch.testing.assert_close(on_images, on_features, atol=1e-6, rtol=1e-5)


def test_a_head_fed_features_of_another_width_names_its_layer_and_both_widths():
    """torch says only "running_mean should contain 16 elements not 32"."""
    body, _ = body_and_head(tiny_model())  # 2 x 8 = 16 features
    _, head = body_and_head(GroupedModel(nn.Identity(), fastai_head(16, 3, hidden=16)))  # its layer 2: BatchNorm1d(32)
    x, y = tiny_images(8)
    features = precompute_features(body, x, batch_size=8)
    opt = torch.optim.SGD(head.parameters(), lr=0.05)
    match = r"layer 2\b.*32.*16"  # the layer and both widths
    with pytest.raises(ValueError, match="fit, step 0.*" + match) as error:
        fit(head, [(features, y)], None, opt, lambda step: 0.05, 1, verbose=False)
    assert "running_mean should contain 16 elements not 32" in str(error.value.__cause__)
    with pytest.raises(ValueError, match="predict.*" + match):
        predict(head, [(features, y)])


def test_body_and_head_share_the_models_modules():
    model = tiny_model()
    body, head = body_and_head(model)
    head_params = {id(p) for p in head.parameters()}
    assert head_params == {id(p) for p in model.layer_groups[2].parameters()}
    assert {id(p) for p in body.parameters()} == {id(p) for g in model.layer_groups[:2] for p in g.parameters()}
    assert len(opt_groups := param_groups(model, 0.1)) == 3 and opt_groups[2]["params"][0] is next(head.parameters())


def test_errors_say_what_to_do(tmp_path):
    body, _ = body_and_head(tiny_model())
    x, _ = tiny_images()
    with pytest.raises(ValueError, match="arch="):
        precompute_features(body, x, batch_size=8, cache=tmp_path)
    with pytest.raises(ValueError, match="batch_size=0"):
        precompute_features(body, x, batch_size=0)
    with pytest.raises(ValueError, match=r"\(1, 8, 8\)"):  # one uint8 image, no batch axis
        precompute_features(body, x[0], batch_size=8)
    with pytest.raises(ValueError, match="n_pool=3"):  # the head's BatchNorm would sit in the body
        body_and_head(tiny_model(), n_pool=3)


# --- the cache is never half-written, never used when it does not match; every error path ----------

def cached_once(tmp_path):
    body = CountingBody(body_and_head(tiny_model())[0])
    x, _ = tiny_images()
    features = precompute_features(body, x, batch_size=8, cache=tmp_path, arch="tiny")
    (path,) = tmp_path.glob("tiny-*.pt")
    return body, x, features, path


def test_a_cache_file_with_the_wrong_rows_is_recomputed_out_loud(tmp_path):
    from minicnn.checkpoint import save_checked
    from minicnn.precompute import FORMAT, cache_key
    body, x, features, path = cached_once(tmp_path)
    key = cache_key("tiny", x, body)
    save_checked(path, FORMAT, {"features": features[:15], "key": key, "rows": 15})  # 15 rows for 20 images
    with pytest.warns(UserWarning, match=r"does not match x \(20, 1, 8, 8\): it holds 15 rows.*recomputing"):
        again = precompute_features(body, x, batch_size=8, cache=tmp_path, arch="tiny")
    assert body.seen == 40 and torch.equal(again, features)
    save_checked(path, FORMAT, {"features": features, "key": "another-key", "rows": 20})  # a renamed file
    with pytest.warns(UserWarning, match="for key another-key; recomputing"):
        precompute_features(body, x, batch_size=8, cache=tmp_path, arch="tiny")
    assert body.seen == 60
    precompute_features(body, x, batch_size=8, cache=tmp_path, arch="tiny")  # rewritten: a silent hit now
    assert body.seen == 60


@pytest.mark.parametrize("damage", ["truncated", "zero bytes", "older plain tensor", "bit flip"])
def test_a_damaged_or_older_cache_file_is_recomputed_out_loud(tmp_path, damage):
    body, x, features, path = cached_once(tmp_path)
    good = path.read_bytes()
    if damage == "older plain tensor":  # what an older minicnn wrote: no checksum, no row count
        torch.save(features[:5], path)
    else:
        path.write_bytes({"truncated": good[:len(good) // 2], "zero bytes": b"",
                          "bit flip": good[:-2000] + bytes([good[-2000] ^ 4]) + good[-1999:]}[damage])
    with pytest.warns(UserWarning, match=f"{path.name}.*Recomputing the features"):
        again = precompute_features(body, x, batch_size=8, cache=tmp_path, arch="tiny")
    assert body.seen == 40 and torch.equal(again, features)
    precompute_features(body, x, batch_size=8, cache=tmp_path, arch="tiny")
    assert body.seen == 40  # the recomputed file is good again


def test_an_interrupted_cache_write_leaves_no_file_and_no_temporary(tmp_path, monkeypatch):
    body = CountingBody(body_and_head(tiny_model())[0])
    x, _ = tiny_images()
    real_save = torch.save

    def save_half_then_die(obj, f):
        real_save(obj, f)
        f.seek(f.tell() // 2)
        f.truncate()
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        precompute_features(body, x, batch_size=8, cache=tmp_path, arch="tiny")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    precompute_features(body, x, batch_size=8, cache=tmp_path, arch="tiny")
    assert body.seen == 40 and [p.suffix for p in tmp_path.iterdir()] == [".pt"]


def test_the_key_sees_the_bodys_modules_and_their_code_not_only_its_weights(tmp_path, monkeypatch):
    import importlib.util
    import sys
    from minicnn.precompute import cache_key
    x, _ = tiny_images()
    model = tiny_model()
    assert cache_key("a", x, body_and_head(model, n_pool=1)[0]) != cache_key("a", x, body_and_head(model)[0])

    def scale_class(name, factor):  # class Scale in its own file: the same name, repr and (no) weights
        (tmp_path / f"{name}.py").write_text(f"from torch import nn\nclass Scale(nn.Module):\n"
                                             f"    def forward(self, x):\n        return x * {factor}\n")
        spec = importlib.util.spec_from_file_location(name, tmp_path / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)  # as an import does: inspect finds its file there
        spec.loader.exec_module(module)
        return module.Scale
    one, edited = scale_class("before", 1), scale_class("after", 2)  # forward() edited between two runs
    assert repr(one()) == repr(edited()) and one.__qualname__ == edited.__qualname__
    assert cache_key("a", x, one()) != cache_key("a", x, edited())
    assert cache_key("a", x, one()) == cache_key("a", x, one())


def test_the_mode_of_every_module_is_restored_even_after_an_error():
    body, _ = body_and_head(tiny_model())
    body.train()
    body[0].eval()  # a frozen group kept in eval mode
    modes = [m.training for m in body.modules()]
    precompute_features(body, tiny_images()[0], batch_size=8)
    assert [m.training for m in body.modules()] == modes
    with pytest.raises(ValueError, match=r"\(4, 3, 8, 8\).*1 channels"):  # a 1-channel stem
        precompute_features(body, torch.zeros(4, 3, 8, 8, dtype=torch.uint8), batch_size=8)
    assert [m.training for m in body.modules()] == modes


def test_bad_images_and_arguments_are_refused_before_the_body_runs(tmp_path):
    body = CountingBody(body_and_head(tiny_model())[0])
    x, _ = tiny_images()
    cases = [
        (dict(x=x.long()), ValueError, "x must be float.*int64"),
        (dict(x=x.float()), ValueError, r"x must be .*\[0, 1\].*\[0, 25\d\]"),  # 0..255 floats
        (dict(x=torch.full((2, 1, 8, 8), float("nan"))), ValueError, "nan"),
        (dict(x=x[:0]), ValueError, r"N >= 1.*\(0, 1, 8, 8\)"),
        (dict(batch_size=-1), ValueError, "batch_size=-1"),
        (dict(cache=tmp_path, arch=""), ValueError, "arch="),
        (dict(cache=tmp_path, arch="../up"), ValueError, "arch=.*'../up'"),
        (dict(cache=tmp_path / "file", arch="tiny"), FileExistsError, "file"),
    ]
    (tmp_path / "file").write_text("x")
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            precompute_features(body, **{"x": x, "batch_size": 8, **change})
    assert body.seen == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written, nothing made
