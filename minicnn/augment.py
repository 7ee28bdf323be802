"""Batched data augmentation: each image of a float batch (N, C, H, W) in [0, 1] gets its own
random flip, rotation, zoom and shift (ONE 2x3 matrix, ONE grid_sample a batch) and lighting.

    theta = (T @ D @ R @ Z)[:2]   maps an output pixel to the input point it samples (affine_grid)
    Z = zoom 1/s, s ~ U(1, max_zoom);  R = rotation by a ~ U(+-max_rotate) degrees, in pixels
    D = flip (or one of the 8 dihedral symmetries);  T = shift t ~ U(+-2 * max_translate)
    lighting: x <- clamp(c * x + (1 - c) * mean(x) + b, 0, 1),  b ~ U(+-max_brightness),
              log c ~ U(+-log(1 + max_contrast))
An image whose matrix is only D is permuted exactly (no resampling). A seeded torch.Generator
fixes the batch. Source: fast.ai 2018 lesson 2 (transforms_side_on / transforms_top_down,
max_zoom=1.1); fastai 2's aug_transforms (one matrix an image, one grid_sample a batch).
"""
import inspect
import math
import numbers

import torch
import torch.nn.functional as F

PADDINGS = ("reflection", "zeros", "border")


SLACK = 1e-3  # resampling rounds a pixel of 1.0 to 1.0000001: that is not a wrong scale


def _check_images(x):
    """A float batch (N, C, H, W) with every pixel finite and in [0, 1]: ONE fused reduction."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected a batch of images (N, C, H, W), got {shape}; "
                         "use x[None] for one image")
    if not x.is_floating_point():
        raise TypeError(f"expected float images in [0, 1], got {x.dtype}; "
                        "convert with x.float() / 255")
    if x.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(x.detach())).tolist()  # NaN propagates: one sync
    if math.isnan(low) or math.isnan(high):
        raise ValueError(f"the images hold {int(torch.isnan(x).sum())} NaN pixels; "
                         "find where they come from (a decode, a division by 0) before augmenting")
    if not (-SLACK <= low and high <= 1 + SLACK):
        hint = ("0..255 pixels? divide by 255" if high > 1 + SLACK
                else "normalise after augmenting, not before")
        raise ValueError(f"expected float images in [0, 1], found values in [{low:.4g}, "
                         f"{high:.4g}]: {hint} (the models here normalise their input themselves)")


def _check_size(size, name="size"):
    """int -> (size, size); (h, w) -> (h, w); both positive ints."""
    pair = (size, size) if isinstance(size, int) else size
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair)):
        raise ValueError(f"{name} must be a positive int or a pair (h, w) of positive ints, "
                         f"got {size!r}")
    return tuple(pair)


def _check_range(name, value, low, high=math.inf):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def _uniform(generator, n, k, device):
    """(n, k) uniforms in [0, 1) from `generator` (None: torch's global RNG), moved to `device`."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator or None, "
                        f"got {type(generator).__name__}")
    source = generator.device if generator is not None else "cpu"
    return torch.rand(n, k, generator=generator, device=source).to(device)


def affine(x, theta, *, padding="reflection"):
    """Resample x (N, C, H, W) through one 2x3 matrix per image, theta (N, 2, 3):
    one grid_sample."""
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    if not isinstance(theta, torch.Tensor) or theta.shape != (x.shape[0], 2, 3):
        shape = tuple(theta.shape) if isinstance(theta, torch.Tensor) else type(theta).__name__
        raise ValueError(f"theta must be one 2x3 matrix per image, ({x.shape[0]}, 2, 3), "
                         f"got {shape}")
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape),
                         align_corners=False)  # (N, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def _symmetries(k):
    """k (N,) in 0..7 -> D (N, 2, 2) = diag(sx, sy) @ (I or swap):
    bit 1 sx = -1, bit 2 sy = -1, bit 4 swap."""
    sx, sy, swap = 1 - 2 * (k & 1), 1 - 2 * (k >> 1 & 1), k >> 2
    return torch.stack([sx * (1 - swap), sx * swap, sy * swap, sy * (1 - swap)], 1).view(-1, 2, 2)


def _permute_pixels(x, k):
    """x (N, C, H, W) through symmetry k (N,), exactly: the same map as affine() with
    _symmetries(k)."""
    N, C, H, W = x.shape
    # Centred pixel coordinates 2j + 1 - W are odd integers: each D maps them to each other.
    cv, cu = torch.meshgrid(torch.arange(H) * 2 + 1 - H, torch.arange(W) * 2 + 1 - W, indexing="ij")
    D = _symmetries(torch.arange(8 if H == W else 4))[:, :, :, None, None]   # (S, 2, 2, 1, 1)
    cu_in = D[:, 0, 0] * cu + D[:, 0, 1] * cv                                # (S, H, W)
    cv_in = D[:, 1, 0] * cu + D[:, 1, 1] * cv
    # input pixel per output pixel, (S, H*W)
    table = ((cv_in + H - 1) // 2 * W + (cu_in + W - 1) // 2).view(-1, H * W)
    index = table[k].to(x.device)[:, None].expand(N, C, H * W)              # (N, C, H*W)
    return x.flatten(2).gather(2, index).view(N, C, H, W)


def random_affine(x, *, generator, flip=0.5, dihedral=False, max_rotate=10.0, max_zoom=1.1,
                  max_translate=0.0, p_affine=0.75, padding="reflection"):
    """Flip, rotate, zoom, shift: one matrix an image (module doc). dihedral=True (square images)
    draws one of the 8 symmetries instead of the flip (they include it)."""
    _check_images(x)
    return _random_affine(x, generator, flip, dihedral, max_rotate, max_zoom, max_translate,
                          p_affine, padding)


def _random_affine(x, generator, flip, dihedral, max_rotate, max_zoom, max_translate, p_affine,
                   padding):
    for name, value, low, high in [
            ("flip", flip, 0, 1), ("p_affine", p_affine, 0, 1), ("max_rotate", max_rotate, 0, 180),
            ("max_zoom", max_zoom, 1, 10), ("max_translate", max_translate, 0, 1)]:
        _check_range(name, value, low, high)
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    N, C, H, W = x.shape
    if dihedral and H != W:
        raise ValueError(f"dihedral=True needs square images, got {H}x{W}; center_crop them first")
    # Six numbers an image, drawn whatever the outcome, so a seed fixes the batch (u on the CPU).
    u = _uniform(generator, N, 6, "cpu").double()        # per image: symmetry, on, a, s, tx, ty
    k = (u[:, 0] * 8).long() if dihedral else (u[:, 0] < flip).long()    # symmetry 0..7
    on = (u[:, 1] < p_affine).double()                # off (prob 1 - p_affine): a = 0, s = 1, t = 0
    angle = torch.deg2rad((2 * u[:, 2] - 1) * max_rotate) * on         # a ~ U(+-max_rotate)
    scale = 1 + (max_zoom - 1) * u[:, 3] * on                          # s ~ U(1, max_zoom)
    # t ~ U(+-2 max_translate), (N, 2)
    shift = (2 * u[:, 4:6] - 1) * 2 * max_translate * on[:, None]
    D = _symmetries(k)                                                    # (N, 2, 2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # R = [[cos a, -sin a*H/W], [sin a*W/H, cos a]]: H/W makes it a rotation in pixels, not a shear
    R = torch.stack([cos, -sin * H / W, sin * W / H, cos], 1).view(N, 2, 2)
    A = D.double() @ R / scale[:, None, None]                           # D @ R @ Z, (N, 2, 2)
    theta = torch.cat([A, shift[:, :, None]], 2)                # (T @ D @ R @ Z)[:2], (N, 2, 3)
    exact = (angle == 0) & (scale == 1) & (shift == 0).all(1)            # only D: permute pixels
    out = torch.empty_like(x)
    if exact.any():
        index = exact.nonzero()[:, 0].to(x.device)                   # indices built on the CPU
        out[index] = _permute_pixels(x[index], k[exact])
    if not exact.all():
        index = (~exact).nonzero()[:, 0].to(x.device)
        out[index] = affine(x[index], theta[~exact], padding=padding)
    return out


def lighting(x, *, generator, max_brightness=0.2, max_contrast=0.2, p=0.75):
    """Random brightness b and contrast c per image: clamp(c*x + (1-c)*mean(x) + b, 0, 1)."""
    _check_images(x)
    return _lighting(x, generator, max_brightness, max_contrast, p)


def _lighting(x, generator, max_brightness, max_contrast, p):
    for name, value in [("max_brightness", max_brightness), ("max_contrast", max_contrast),
                        ("p", p)]:
        _check_range(name, value, 0, 1)
    u = _uniform(generator, x.shape[0], 3, x.device).to(x.dtype)    # per image: on, b, c
    on = (u[:, 0] < p).to(x.dtype)
    # b ~ U(+-max_brightness), log c ~ U(+-log(1 + max_contrast)), both (N, 1, 1, 1)
    b = ((2 * u[:, 1] - 1) * max_brightness * on).view(-1, 1, 1, 1)
    c = torch.exp((2 * u[:, 2] - 1) * math.log1p(max_contrast) * on).view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)                         # (N, 1, 1, 1)
    # clamp(c*x + (1-c)*mean + b, 0, 1), written so that b = 0, c = 1 gives x back bit for bit
    return (c * x + (1 - c) * mean + b).clamp(0, 1)


def _preset(dihedral, generator, max_rotate, max_zoom, max_lighting, p, padding):
    _check_range("p", p, 0, 1)  # the caller's name for it (it becomes p_affine and lighting's p)
    geometry = dict(flip=0.0 if dihedral else 0.5, dihedral=dihedral, max_rotate=max_rotate,
                    max_zoom=max_zoom, max_translate=0.0, p_affine=p, padding=padding)
    light = dict(max_brightness=max_lighting, max_contrast=max_lighting, p=p)
    no_images = torch.zeros(0, 1, 1, 1)         # checks the arguments now; draws no numbers
    lighting(random_affine(no_images, generator=generator, **geometry), generator=generator,
             **light)

    def apply(x):
        _check_images(x)                        # once: the hot path pays one reduction
        x = _random_affine(x, generator, **geometry)
        return _lighting(x, generator, **light)
    return apply


def side_on(*, generator=None, max_rotate=10.0, max_zoom=1.1, max_lighting=0.05, p=0.75,
            padding="reflection"):
    """fastai's transforms_side_on (photos taken from the side: a horizontal flip is fine).
    Returns a function x -> x drawing from `generator` (None: torch's global RNG). p is the
    probability of the rotate+zoom and, separately, of the lighting change (fastai 2's 0.75)."""
    return _preset(False, generator, max_rotate, max_zoom, max_lighting, p, padding)


def top_down(*, generator=None, max_rotate=10.0, max_zoom=1.1, max_lighting=0.05, p=0.75,
             padding="reflection"):
    """fastai's transforms_top_down (satellite photos: any of the 8 dihedral symmetries).
    Returns a function x -> x drawing from `generator`; images must be square."""
    return _preset(True, generator, max_rotate, max_zoom, max_lighting, p, padding)


AUGMENTATIONS = {"side_on": side_on, "top_down": top_down}


def augment(x, generator, preset="side_on"):
    """Apply a preset: a name in AUGMENTATIONS, or a factory like side_on /
    partial(side_on, max_zoom=1.2)."""
    factory = AUGMENTATIONS.get(preset) if isinstance(preset, str) else preset
    if not callable(factory):
        raise ValueError(f"preset must be one of {sorted(AUGMENTATIONS)} or a factory like "
                         f"side_on, got {preset!r}")
    try:
        inspect.signature(factory).bind(generator=generator)
    except TypeError:
        raise TypeError(f"preset {preset!r} must take generator= and return a function x -> x, "
                        "like side_on; for a function x -> x itself, call it directly") from None
    except ValueError:                          # no signature to read (a builtin): just call it
        pass
    return factory(generator=generator)(x)


def resize(x, size):
    """Antialiased bilinear resize of (N, C, H, W) to size (int: square, or (h, w)), for progressive
    resizing. uint8 stays uint8 (rounded), so a whole dataset can be resized once."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError("resize expects a batch (N, C, H, W); use x[None] for one image")
    if not (x.is_floating_point() or x.dtype == torch.uint8):
        raise TypeError(f"resize takes float or uint8 images, got {x.dtype}; "
                        "convert with x.float()")
    h, w = _check_size(size)
    chunks = []
    for chunk in x.split(4096):                 # bounded memory when x is a whole dataset
        y = F.interpolate(chunk if chunk.is_floating_point() else chunk.float(), size=(h, w),
                          mode="bilinear", antialias=True, align_corners=False)
        chunks.append(y.to(x.dtype) if x.is_floating_point()
                      else y.round().clamp(0, 255).to(x.dtype))
    return torch.cat(chunks)


def center_crop(x, size):
    """The centred size (int or (h, w)) window of (..., H, W);
    offsets (H - h) // 2, (W - w) // 2."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"center_crop expects a tensor (..., H, W), got {shape}")
    h, w = _check_size(size)
    H, W = x.shape[-2:]
    if not (1 <= h <= H and 1 <= w <= W):
        raise ValueError(f"crop size {(h, w)} must be positive and fit in the image {(H, W)}")
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top:top + h, left:left + w]
