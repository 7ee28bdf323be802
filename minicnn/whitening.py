"""Whitening initialisation: the first convolution's filters make the image patches it sees
uncorrelated, with unit variance, before training starts.

Take n random k x k patches p of the training images, after the normalisation the network
applies (flattened: d = C*k*k numbers each), then
    Sigma = mean_j (p_j - p_mean)(p_j - p_mean)^T       the patches' covariance, (d, d)
    Sigma = V diag(lambda) V^T                          lambda_1 >= ... >= lambda_d
    W_i = v_i / sqrt(lambda_i + eps)                    filter i: eigenvector i, scaled
    filters = [W_1 .. W_d, -W_1 .. -W_d][:out_channels]
so cov(W p) = diag(lambda / (lambda + eps)), about the identity. +W and -W let a ReLU after
the conv pass both signs. The bias is set to 0 and the conv frozen, as the speedruns do.
Source: Coates & Ng 2011 (whitened patches); the CIFAR-10 speedruns hlb-CIFAR10 (tysam-code)
and airbench (Keller Jordan). More, and what they report: docs/whitening.md.
"""
import torch


def sample_patches(x, kernel_size, n_patches, *, dilation=(1, 1), generator=None):
    """n_patches patches of kernel_size (kh, kw) at random places of random images of x
    (N, C, H, W), float in [0, 1] or uint8 (divided by 255) -> (n_patches, C, kh, kw) float.
    No padding: every patch lies inside its image. Drawn with replacement from generator."""
    (kh, kw), (dh, dw) = kernel_size, dilation
    n, c, h, w = x.shape
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1  # the height, width a patch covers
    image = torch.randint(n, (n_patches,), generator=generator)
    top = torch.randint(h - span_h + 1, (n_patches,), generator=generator)
    left = torch.randint(w - span_w + 1, (n_patches,), generator=generator)
    rows = top[:, None] + dh * torch.arange(kh)  # (n_patches, kh)
    cols = left[:, None] + dw * torch.arange(kw)  # (n_patches, kw)
    # one gather, broadcast to (n_patches, C, kh, kw): no copy of every patch of every image
    index = (image[:, None, None, None], torch.arange(c)[None, :, None, None],
             rows[:, None, :, None], cols[:, None, None, :])
    patches = x[tuple(i.to(x.device) for i in index)]
    return patches.float() / 255 if x.dtype == torch.uint8 else patches.float()


@torch.no_grad()
def whiten_(conv, x, *, normalize=None, eps=5e-4, n_patches=10_000, generator=None,
            freeze=True):
    """Set conv's (nn.Conv2d, groups=1) filters, in place, to whiten the patches of images x
    (N, C, H, W; float in [0, 1] or uint8) -> the eigenvalues lambda, largest first, (d,).

    normalize: what the network does to x before conv (simple_resnet: its Normalize layer), or
        None. It is applied to the patches: for a per-channel map the same as to the images.
    eps (airbench's 5e-4): keeps 1/sqrt(lambda + eps) finite where a direction has no variance.
    n_patches: patches drawn at random (conv's kernel size and dilation, no padding) with
        generator; at least d = C*k*k, else Sigma is singular.
    freeze: conv.requires_grad_(False), as the speedruns train. freeze.unfreeze and
        freeze.freeze_to set requires_grad for whole layer groups: freeze it again after them.
    """
    d = conv.weight[0].numel()  # C*kh*kw: the numbers in one patch
    if conv.groups != 1 or conv.in_channels != x.shape[1]:
        raise ValueError(f"conv: in_channels={conv.in_channels}, groups={conv.groups}; images: "
                         f"{x.shape[1]} channels. Give a conv with groups=1 and as many channels")
    if n_patches < d:
        raise ValueError(f"n_patches={n_patches} < d = C*k*k = {d}: the covariance would be "
                         f"singular; draw more (10*d or more gives a good estimate)")
    p = sample_patches(x, conv.kernel_size, n_patches, dilation=conv.dilation,
                       generator=generator)  # (n, C, kh, kw)
    if normalize is not None:
        p = normalize(p)
    p = p.reshape(n_patches, d).cpu().double()  # (n, d); float64: eigh of a small matrix
    sigma = torch.cov(p.T, correction=0)  # Sigma = mean_j (p_j - p_mean)(p_j - p_mean)^T
    lam, v = torch.linalg.eigh(sigma)  # Sigma = V diag(lambda) V^T, lambda ascending
    lam, v = lam.flip(0), v.flip(1)  # largest first: with few filters, keep the top ones
    w = v.T / torch.sqrt(lam + eps)[:, None]  # row i: W_i = v_i / sqrt(lambda_i + eps), (d, d)
    w = torch.cat([w, -w])[:conv.out_channels]  # [+W, -W], (min(out_channels, 2d), d)
    conv.weight[:len(w)] = w.reshape(len(w), *conv.weight.shape[1:]).to(conv.weight)
    if conv.bias is not None:
        conv.bias.zero_()
    if freeze:
        conv.requires_grad_(False)
    return lam.float()


def simple_resnet_stem(model):
    """(normalisation, first conv) of a minicnn simple_resnet, for whiten_(conv, x,
    normalize=normalisation): its layer_groups[0] is [Normalize, conv-BN-ReLU, residual block],
    so they are model.layer_groups[0][0] and model.layer_groups[0][1][0]."""
    return model.layer_groups[0][0], model.layer_groups[0][1][0]
