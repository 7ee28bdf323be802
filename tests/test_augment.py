"""augment.py: identity parameters give the input back, flips/rotations equal torch's, a seed fixes
the batch, each image gets its own draw, lighting follows its formula, every error path."""
import functools

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from hypothesis import given
from hypothesis import strategies as st

from minicnn.augment import (affine, augment, center_crop, lighting, random_affine, resize, side_on,
                             top_down)

sizes = st.integers(1, 12)
seeds = st.integers(0, 2**31 - 1)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def images(n, c, h, w, seed=0):
    return torch.rand(n, c, h, w, generator=gen(seed))


def dihedral_views(x):
    """The 8 symmetries of square images, written with torch.rot90 and torch.flip."""
    rots = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    return rots + [r.flip(-1) for r in rots]


def matrix(rows):
    return torch.tensor(rows, dtype=torch.float32)[None]


# ---- identity parameters ------------------------------------------------------------------

@given(n=st.integers(1, 5), c=st.integers(1, 3), h=sizes, w=sizes, seed=seeds, p_affine=st.floats(0, 1))
def test_identity_parameters_give_the_input_back_bit_for_bit(n, c, h, w, seed, p_affine):
    x = images(n, c, h, w, seed)
    out = random_affine(x, generator=gen(seed), flip=0, max_rotate=0, max_zoom=1, p_affine=p_affine)
    assert torch.equal(out, x)
    assert torch.equal(lighting(x, generator=gen(seed), max_brightness=0, max_contrast=0, p=1), x)
    assert torch.equal(lighting(x, generator=gen(seed), p=0), x)


@given(h=st.integers(1, 40), w=st.integers(1, 40), padding=st.sampled_from(["reflection", "zeros", "border"]))
def test_identity_matrix_through_grid_sample_is_the_identity_to_the_stated_tolerance(h, w, padding):
    x = images(2, 2, h, w)
    out = affine(x, matrix([[1, 0, 0], [0, 1, 0]]).expand(2, 2, 3), padding=padding)
    assert torch.allclose(out, x, rtol=0, atol=1e-7 * max(h, w) + 1e-7)


# ---- flips and the dihedral group ------------------------------------------------------------

@given(n=st.integers(1, 4), h=sizes, w=sizes)
def test_flip_probability_one_is_torch_flip_exactly(n, h, w):
    x = images(n, 3, h, w)
    assert torch.equal(random_affine(x, generator=gen(0), flip=1, p_affine=0), x.flip(-1))


@pytest.mark.parametrize("rows, view", [
    ([[-1, 0, 0], [0, 1, 0]], lambda x: x.flip(-1)),
    ([[1, 0, 0], [0, -1, 0]], lambda x: x.flip(-2)),
    ([[0, -1, 0], [1, 0, 0]], lambda x: torch.rot90(x, 1, dims=(-2, -1))),
    ([[-1, 0, 0], [0, -1, 0]], lambda x: torch.rot90(x, 2, dims=(-2, -1))),
    ([[0, 1, 0], [-1, 0, 0]], lambda x: torch.rot90(x, 3, dims=(-2, -1))),
    ([[0, 1, 0], [1, 0, 0]], lambda x: x.transpose(-1, -2)),
])
def test_symmetry_matrices_through_grid_sample_equal_torch_rot90_and_flip(rows, view):
    x = images(3, 2, 9, 9)
    assert torch.allclose(affine(x, matrix(rows).expand(3, 2, 3)), view(x), rtol=0, atol=1e-6)


def test_dihedral_gives_one_of_the_8_symmetries_exactly_and_all_of_them_appear():
    x = images(1, 1, 5, 5).expand(64, 1, 5, 5).contiguous()
    out = random_affine(x, generator=gen(1), dihedral=True, p_affine=0)
    views = dihedral_views(x[:1])
    which = [[torch.equal(o[None], v) for v in views].index(True) for o in out]
    assert set(which) == set(range(8))


@pytest.mark.parametrize("dihedral", [False, True])
def test_exact_symmetry_path_agrees_with_the_resampled_path_for_the_same_draws(dihedral):
    # max_zoom 1 + 1e-6 sends every image through grid_sample with nearly the same matrix.
    x = images(32, 1, 7, 7)
    kwargs = dict(dihedral=dihedral, max_rotate=0, p_affine=1)
    exact = random_affine(x, generator=gen(5), max_zoom=1, **kwargs)
    resampled = random_affine(x, generator=gen(5), max_zoom=1 + 1e-6, **kwargs)
    assert torch.allclose(exact, resampled, atol=1e-4)
    assert not torch.equal(exact, x)


# ---- rotation, zoom, padding ----------------------------------------------------------------

def test_zoom_2_is_the_centre_crop_upsampled_inside_the_border():
    x = images(2, 1, 8, 8)
    zoomed = affine(x, matrix([[0.5, 0, 0], [0, 0.5, 0]]).expand(2, 2, 3))
    expected = F.interpolate(center_crop(x, 4), size=8, mode="bilinear", align_corners=False)
    assert torch.allclose(zoomed[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-6)


def test_rotation_of_a_non_square_image_is_a_rotation_in_pixels_not_a_shear():
    # A single bright pixel 2 px right of the centre of a 7x15 image, rotated 90 degrees with
    # max_rotate=90 forced by p_affine=1 and a generator whose draw we read back.
    x = torch.zeros(1, 1, 7, 15)
    x[0, 0, 3, 9] = 1.0
    u = torch.rand(1, 6, generator=gen(3)).double()
    angle = (2 * u[0, 2] - 1) * 90
    out = random_affine(x, generator=gen(3), flip=0, max_rotate=90, max_zoom=1, p_affine=1, padding="zeros")
    rows, cols = torch.meshgrid(torch.arange(7.0), torch.arange(15.0), indexing="ij")
    w = out[0, 0] / out.sum()
    centre_y, centre_x = (w * rows).sum() - 3, (w * cols).sum() - 7       # mass centre, from middle
    radius = torch.hypot(centre_x, centre_y)
    assert abs(radius - 2) < 0.1, "a shear would change the distance to the centre"
    # Output pixel p samples input R p: the bright spot moves by the inverse rotation.
    assert torch.isclose(torch.atan2(centre_y, centre_x), -torch.deg2rad(angle).float(), atol=0.05)


@given(seed=seeds, value=st.floats(0, 1))
def test_reflection_padding_keeps_a_constant_image_constant_zeros_do_not(seed, value):
    x = torch.full((4, 1, 10, 10), value)
    kwargs = dict(max_rotate=45, max_zoom=1.0, p_affine=1)
    out = random_affine(x, generator=gen(seed), padding="reflection", **kwargs)
    assert torch.allclose(out, x, atol=1e-6)
    if value > 0.1:
        assert random_affine(x, generator=gen(seed), padding="zeros", **kwargs).min() < value - 0.05


# ---- randomness: seeds and per-image parameters ----------------------------------------------

@given(seed=seeds, preset=st.sampled_from(["side_on", "top_down"]))
def test_same_seed_same_batch_different_seed_different_batch(seed, preset):
    x = images(6, 1, 8, 8)
    a, b = augment(x, gen(seed), preset), augment(x, gen(seed), preset)
    assert torch.equal(a, b)
    assert not torch.equal(a, augment(x, gen(seed + 1), preset))
    assert torch.equal(a, {"side_on": side_on, "top_down": top_down}[preset](generator=gen(seed))(x))


def test_each_image_gets_its_own_parameters():
    x = images(1, 1, 12, 12).expand(32, 1, 12, 12)
    out = side_on(generator=gen(0), p=1)(x)
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) == 32


@given(p=st.sampled_from([0.25, 0.5, 0.75]))
def test_probabilities_are_per_image_frequencies(p):
    x = images(1, 1, 6, 6).expand(800, 1, 6, 6)
    changed = (random_affine(x, generator=gen(0), flip=0, p_affine=p) != x).flatten(1).any(1)
    assert abs(changed.float().mean().item() - p) < 0.06
    changed = (lighting(x, generator=gen(0), p=p) != x).flatten(1).any(1)
    assert abs(changed.float().mean().item() - p) < 0.06


# ---- lighting follows its formula ------------------------------------------------------------

@given(seed=seeds, max_brightness=st.floats(0.01, 0.25))
def test_brightness_adds_one_offset_per_image_within_its_range(seed, max_brightness):
    x = 0.3 + 0.4 * images(5, 2, 4, 4, seed)                   # away from 0 and 1: no clamping
    diff = lighting(x, generator=gen(seed), max_brightness=max_brightness, max_contrast=0, p=1) - x
    offset = diff.flatten(1)
    assert torch.allclose(offset, offset[:, :1].expand_as(offset), atol=1e-6)
    assert (offset.abs() <= max_brightness + 1e-6).all()


@given(seed=seeds, max_contrast=st.floats(0.01, 0.3))
def test_contrast_scales_around_the_image_mean_within_its_range(seed, max_contrast):
    x = 0.4 + 0.2 * images(5, 2, 4, 4, seed)
    out = lighting(x, generator=gen(seed), max_brightness=0, max_contrast=max_contrast, p=1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(out.mean(dim=(1, 2, 3), keepdim=True), mean, atol=1e-6)
    centred = x - mean
    dims = dict(dim=(1, 2, 3), keepdim=True)
    factor = ((out - mean) * centred).sum(**dims) / centred.square().sum(**dims)    # least squares
    assert torch.allclose(out, mean + factor * centred, atol=1e-6)       # one factor per image
    assert (factor >= 1 / (1 + max_contrast) - 1e-5).all() and (factor <= 1 + max_contrast + 1e-5).all()


@given(seed=seeds, dtype=st.sampled_from([torch.float32, torch.float64]))
def test_presets_keep_shape_dtype_device_and_the_0_1_range(seed, dtype):
    x = images(4, 3, 10, 10, seed).to(dtype)
    for preset in ["side_on", "top_down"]:
        out = augment(x, gen(seed), preset)
        assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
        assert out.min() >= 0 and out.max() <= 1


def test_augment_takes_a_preset_factory():
    x = images(4, 1, 8, 8)
    factory = functools.partial(side_on, max_rotate=30)
    assert torch.equal(augment(x, gen(2), factory), side_on(generator=gen(2), max_rotate=30)(x))


# ---- resize and crop -------------------------------------------------------------------------

@pytest.mark.parametrize("size", [14, (7, 20), 28, 40])
def test_resize_matches_torchvision_antialiased_resize(size):
    x = images(3, 1, 28, 28)
    expected = TF.resize(x, [size, size] if isinstance(size, int) else list(size), antialias=True)
    assert torch.allclose(resize(x, size), expected, atol=1e-5)


def test_resize_keeps_uint8_and_rounds():
    x = (images(5000, 1, 8, 8) * 255).to(torch.uint8)           # more than one 4096 chunk
    out = resize(x, 4)
    assert out.dtype == torch.uint8
    assert torch.equal(out, resize(x.float(), 4).round().to(torch.uint8))


def test_center_crop_is_the_centred_window():
    x = torch.arange(6 * 8.0).view(1, 1, 6, 8)
    assert torch.equal(center_crop(x, 4), x[..., 1:5, 2:6])
    assert torch.equal(center_crop(x, (2, 8)), TF.center_crop(x, [2, 8]))


# ---- devices ---------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batch_stays_on_cuda_and_matches_the_cpu_result():
    x = images(8, 3, 16, 16)
    for preset in ["side_on", "top_down"]:
        out = augment(x.cuda(), gen(4), preset)          # a CPU generator drives a CUDA batch
        assert out.is_cuda and out.dtype == x.dtype
        assert torch.allclose(out.cpu(), augment(x, gen(4), preset), atol=1e-5)


# ---- error paths -----------------------------------------------------------------------------

@pytest.mark.parametrize("call, words", [
    (lambda: random_affine(torch.rand(1, 8, 8), generator=None), r"x must be float.*\(1, 8, 8\)"),
    (lambda: lighting(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), generator=None), "uint8"),
    (lambda: random_affine(torch.rand(1, 1, 4, 4), generator=None, flip=1.5), r"flip.*1\.5"),
    (lambda: random_affine(torch.rand(1, 1, 4, 4), generator=None, max_zoom=0.9), r"zoom.*0\.9"),
    (lambda: random_affine(torch.rand(1, 1, 4, 4), generator=None, max_rotate=-1), "max_rotate"),
    (lambda: random_affine(torch.rand(1, 1, 4, 4), generator=None, max_translate=2), "translate"),
    (lambda: random_affine(torch.rand(1, 1, 4, 6), generator=None, dihedral=True), r"square.*4x6"),
    (lambda: top_down(generator=None)(torch.rand(2, 1, 4, 6)), r"square.*4x6"),
    (lambda: lighting(torch.rand(1, 1, 4, 4), generator=None, max_brightness=2), "max_brightness"),
    (lambda: lighting(torch.rand(1, 1, 4, 4), generator=None, max_contrast=-1), "max_contrast"),
    (lambda: lighting(torch.rand(1, 1, 4, 4), generator=None, p=-0.1), r"^p .*-0\.1"),
    (lambda: side_on(max_zoom=0.5), r"max_zoom.*0\.5"),
    (lambda: side_on(max_lighting=float("nan")), "max_lighting"),
    (lambda: side_on(p=2.0), r"^p .*2\.0"),        # the caller wrote p, not p_affine
    (lambda: top_down(p=-0.5), r"^p .*-0\.5"),
    # flip is a probability: True would mean "always", where a reader means "random flips"
    (lambda: random_affine(torch.rand(1, 1, 4, 4), generator=None, flip=True), "flip.*True"),
    (lambda: center_crop(torch.rand(1, 1, 4, 4), 5), r"crop size.*\(4, 4\)"),
    (lambda: center_crop(torch.rand(1, 1, 4, 4), (2, 0)), "crop size"),
])
def test_bad_input_says_what_is_wrong(call, words):
    with pytest.raises(ValueError, match=words):
        call()


def test_progressive_resizing_trains_one_model_at_14_then_28_pixels():
    from minicnn.data import Batches
    from minicnn.models import simple_resnet
    from minicnn.train import fit
    x = (images(64, 1, 28, 28) * 255).to(torch.uint8)
    y = torch.arange(64) % 3
    model = simple_resnet(3, widths=(4, 8))
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    before = [p.detach().clone() for p in params]
    small = Batches(resize(x, 14), y, 32, shuffle=True, generator=gen(0))
    fit(model, small, None, opt, lambda step: 0.05, 1, augment=side_on(generator=gen(1)), verbose=False)
    after_small = [p.detach().clone() for p in params]
    full = Batches(x, y, 32, shuffle=True, generator=gen(0))
    fit(model, full, None, opt, lambda step: 0.05, 1, augment=side_on(generator=gen(1)), verbose=False)
    assert all(a is b for a, b in zip(params, model.parameters()))        # same tensors: not rebuilt
    assert any(not torch.equal(a, b) for a, b in zip(before, after_small))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(after_small, params))


# ---- pixels outside [0, 1]: 0..255 floats, NaN ------------------------------------------------

def nan_images():
    x = images(3, 1, 8, 8)
    x[1, 0, 2, 5] = float("nan")
    return x


CALLS = {
    "side_on": lambda x: side_on(generator=gen(0))(x),
    "top_down": lambda x: top_down(generator=gen(0))(x),
    "augment": lambda x: augment(x, gen(0), "side_on"),
    "random_affine": lambda x: random_affine(x, generator=gen(0)),
    "lighting": lambda x: lighting(x, generator=gen(0)),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=list(CALLS))
@pytest.mark.parametrize("x, words", [
    (images(3, 1, 8, 8) * 255, r"in \[0, 1\].*\[0\.3152, 254\.3\]"),  # 0..255: 99% would clamp to 1
    (images(3, 1, 8, 8) - 0.5, r"\[-0\.\d+, 0\.\d+\]"),                     # already normalised
    (torch.full((2, 1, 4, 4), float("inf")), "inf"),
    (nan_images(), "nan"),
], ids=["0-255", "normalised", "inf", "nan"])
def test_pixels_outside_0_1_are_refused_before_any_work(call, x, words):
    with pytest.raises(ValueError, match=words):
        call(x)


def test_resampling_rounding_just_above_1_is_accepted():
    x = torch.ones(2, 1, 6, 6) + 1e-6
    assert side_on(generator=gen(0))(x).max() <= 1 + 1e-5
    assert random_affine(torch.zeros(0, 1, 6, 6), generator=gen(0)).shape == (0, 1, 6, 6)   # empty: no reduction


def test_a_preset_checks_the_pixels_with_one_reduction_per_batch(monkeypatch):
    calls = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda x: calls.append(x.shape) or real(x))
    side_on(generator=gen(0))(images(8, 1, 6, 6))
    assert calls == [(8, 1, 6, 6)]
