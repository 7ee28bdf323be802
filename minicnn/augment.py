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
import math

import torch
import torch.nn.functional as F


def _uniform(generator, n, k, device):
    """(n, k) uniforms in [0, 1) from `generator` (None: torch's global RNG), moved to `device`."""
    source = generator.device if generator is not None else "cpu"
    return torch.rand(n, k, generator=generator, device=source).to(device)


def affine(x, theta, *, padding="reflection"):
    """Resample x (N, C, H, W) through one 2x3 matrix per image, theta (N, 2, 3):
    one grid_sample."""
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
    check_images(x)
    _check_ranges(flip=flip, p_affine=p_affine, max_rotate=max_rotate, max_zoom=max_zoom,
                  max_translate=max_translate)
    return _random_affine(x, generator, flip, dihedral, max_rotate, max_zoom, max_translate,
                          p_affine, padding)


def _random_affine(x, generator, flip, dihedral, max_rotate, max_zoom, max_translate, p_affine,
                   padding):
    N, C, H, W = x.shape
    if dihedral and H != W:  # a swap would stretch a non-square image
        raise ValueError(f"dihedral=True needs square images, got {H}x{W}; center_crop them")
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
    check_images(x)
    _check_ranges(max_brightness=max_brightness, max_contrast=max_contrast, p=p)
    return _lighting(x, generator, max_brightness, max_contrast, p)


def _lighting(x, generator, max_brightness, max_contrast, p):
    u = _uniform(generator, x.shape[0], 3, x.device).to(x.dtype)    # per image: on, b, c
    on = (u[:, 0] < p).to(x.dtype)
    # b ~ U(+-max_brightness), log c ~ U(+-log(1 + max_contrast)), both (N, 1, 1, 1)
    b = ((2 * u[:, 1] - 1) * max_brightness * on).view(-1, 1, 1, 1)
    c = torch.exp((2 * u[:, 2] - 1) * math.log1p(max_contrast) * on).view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)                         # (N, 1, 1, 1)
    # clamp(c*x + (1-c)*mean + b, 0, 1), written so that b = 0, c = 1 gives x back bit for bit
    return (c * x + (1 - c) * mean + b).clamp(0, 1)


def _preset(dihedral, generator, max_rotate, max_zoom, max_lighting, p, padding):
    _check_ranges(p=p, max_rotate=max_rotate, max_zoom=max_zoom, max_lighting=max_lighting)
    geometry = dict(flip=0.0 if dihedral else 0.5, dihedral=dihedral, max_rotate=max_rotate,
                    max_zoom=max_zoom, max_translate=0.0, p_affine=p, padding=padding)
    light = dict(max_brightness=max_lighting, max_contrast=max_lighting, p=p)

    def apply(x):
        check_images(x)                         # once: the hot path pays one reduction
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
    factory = AUGMENTATIONS[preset] if isinstance(preset, str) else preset  # KeyError: a typo
    return factory(generator=generator)(x)


def resize(x, size):
    """Antialiased bilinear resize of (N, C, H, W) to size (int: square, or (h, w)), for progressive
    resizing. uint8 stays uint8 (rounded), so a whole dataset can be resized once."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    chunks = []
    for chunk in x.split(4096):                 # bounded memory when x is a whole dataset
        y = F.interpolate(chunk if chunk.is_floating_point() else chunk.float(), size=size,
                          mode="bilinear", antialias=True, align_corners=False)
        chunks.append(y.to(x.dtype) if x.is_floating_point()
                      else y.round().clamp(0, 255).to(x.dtype))
    return torch.cat(chunks)


def center_crop(x, size):
    """The centred size (int or (h, w)) window of (..., H, W);
    offsets (H - h) // 2, (W - w) // 2."""
    h, w = (size, size) if isinstance(size, int) else size
    H, W = x.shape[-2:]
    if not (1 <= h <= H and 1 <= w <= W):  # slicing would give a smaller window, silently
        raise ValueError(f"crop size {(h, w)} must fit in the image {(H, W)}")
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top:top + h, left:left + w]


# ---- checks: bad input fails here, before any work -------------------------------------------

LIMITS = dict(flip=(0, 1), p_affine=(0, 1), p=(0, 1), max_rotate=(0, 180), max_zoom=(1, 10),
              max_translate=(0, 1), max_brightness=(0, 1), max_contrast=(0, 1), max_lighting=(0, 1))
SLACK = 1e-3  # resampling rounds a pixel of 1.0 to 1.0000001: that is not a wrong scale


def check_images(x, name="x"):
    """x must be a float batch (N, C, H, W) in [0, 1]: 0..255 floats would clamp to white, NaN
    would spread. One fused reduction (NaN propagates: one sync). plots and precompute use it."""
    low, high = torch.stack(torch.aminmax(x.detach())).tolist() if x.numel() else (0, 0)
    if x.dim() != 4 or not x.is_floating_point() or not -SLACK <= low <= high <= 1 + SLACK:
        raise ValueError(f"{name} must be float images (N, C, H, W) in [0, 1] (0..255? divide by "
                         f"255), got {x.dtype} {tuple(x.shape)} in [{low:.4g}, {high:.4g}]")


def _check_ranges(**values):
    """Each value in its LIMITS: a probability of 1.5 or a zoom of 0.9 would pass silently."""
    for name, value in values.items():
        low, high = LIMITS[name]
        if isinstance(value, bool) or not low <= value <= high:  # True: "random", not "always"
            raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
