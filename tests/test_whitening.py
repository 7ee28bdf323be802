"""whitening.py: the whitened conv's outputs on the patches have identity covariance; the
eigenvalues agree with numpy's; +W, -W pairs and the top eigenvectors; the same generator gives
the same filters; bad input refused; simple_resnet's stem whitened, nothing else touched."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minicnn.models import simple_resnet
from minicnn.whitening import sample_patches, simple_resnet_stem, whiten_


def images(n=64, c=3, size=12, seed=0):
    """Float images in [0, 1] whose neighbouring pixels and channels are correlated, as in photos:
    noise blurred, plus a grey level shared by the channels."""
    g = torch.Generator().manual_seed(seed)
    noise = F.avg_pool2d(torch.rand(n, c, size + 2, size + 2, generator=g), 3, stride=1)
    return (0.5 * noise + 0.5 * noise.mean(dim=1, keepdim=True)).clamp(0, 1)  # (n, c, size, size)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def outputs_on_patches(conv, x, n_patches, seed=0, normalize=None):
    """The conv's outputs on the very patches whiten_ drew (same generator seed) -> (n, out)."""
    p = sample_patches(x, conv.kernel_size, n_patches, dilation=conv.dilation,
                       generator=seeded(seed))
    p = p if normalize is None else normalize(p)
    return F.conv2d(p.double(), conv.weight.double()).flatten(1)  # (n, out, 1, 1) -> (n, out)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kernel_size", [2, 3])
def test_the_outputs_on_the_patches_have_identity_covariance(channels, kernel_size):
    x, d = images(c=channels), channels * kernel_size ** 2
    conv = nn.Conv2d(channels, 2 * d, kernel_size)
    lam = whiten_(conv, x, eps=0.0, n_patches=4000, generator=seeded())
    out = outputs_on_patches(conv, x, 4000)
    cov = torch.cov(out[:, :d].T, correction=0)
    torch.testing.assert_close(cov, torch.eye(d, dtype=cov.dtype), atol=2e-4, rtol=0)
    assert torch.equal(conv.weight[d:], -conv.weight[:d])  # the -W half mirrors the +W half
    assert (lam[:-1] >= lam[1:]).all() and lam[-1] > 0  # largest first


def test_eps_shrinks_the_variance_to_lambda_over_lambda_plus_eps():
    x, eps = images(), 0.01
    conv = nn.Conv2d(3, 27, 3, bias=False)
    lam = whiten_(conv, x, eps=eps, n_patches=4000, generator=seeded()).double()
    cov = torch.cov(outputs_on_patches(conv, x, 4000).T, correction=0)
    torch.testing.assert_close(cov, torch.diag(lam / (lam + eps)), atol=2e-4, rtol=0)
    assert cov.diagonal().min() < 0.9  # the smallest directions are visibly shrunk here


def test_the_eigenvalues_are_numpys_of_the_patches_covariance():
    x = images()
    lam = whiten_(nn.Conv2d(3, 8, 2), x, n_patches=3000, generator=seeded())
    p = sample_patches(x, (2, 2), 3000, generator=seeded()).flatten(1).double().numpy()
    expected = np.linalg.eigvalsh(np.cov(p.T, bias=True))[::-1]
    np.testing.assert_allclose(lam.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_few_filters_are_the_top_eigenvectors_and_filters_past_2d_keep_their_values():
    x = images(c=1)  # d = 9
    few, wide = nn.Conv2d(1, 4, 3), nn.Conv2d(1, 24, 3)
    before = wide.weight.detach().clone()
    for conv in (few, wide):
        whiten_(conv, x, n_patches=2000, generator=seeded())
    assert torch.equal(few.weight, wide.weight[:4])
    assert torch.equal(wide.weight[18:], before[18:])  # 2d = 18 whitened, the rest as it was
    assert torch.equal(wide.bias, torch.zeros(24))


def test_the_same_generator_gives_the_same_filters_and_leaves_the_global_rng_alone():
    x, convs = images(), [nn.Conv2d(3, 6, 3) for _ in range(3)]
    state = torch.get_rng_state()
    for conv, seed in zip(convs, (0, 0, 1)):
        whiten_(conv, x, n_patches=1000, generator=seeded(seed))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(convs[0].weight, convs[1].weight)
    assert not torch.equal(convs[0].weight, convs[2].weight)  # other patches, other estimate


def test_uint8_images_are_divided_by_255():
    x = (images() * 255).round().to(torch.uint8)
    a, b = nn.Conv2d(3, 6, 2), nn.Conv2d(3, 6, 2)
    whiten_(a, x, n_patches=1000, generator=seeded())
    whiten_(b, x.float() / 255, n_patches=1000, generator=seeded())
    assert torch.equal(a.weight, b.weight)


def test_freeze_sets_requires_grad_false_and_freeze_false_leaves_it():
    frozen, trained = nn.Conv2d(1, 4, 3), nn.Conv2d(1, 4, 3)
    whiten_(frozen, images(c=1), n_patches=100, generator=seeded())
    whiten_(trained, images(c=1), n_patches=100, generator=seeded(), freeze=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in trained.parameters())


def test_bad_input_is_refused_by_name():
    with pytest.raises(ValueError, match="in_channels=3, groups=1; images: 1 channels"):
        whiten_(nn.Conv2d(3, 4, 3), images(c=1))
    with pytest.raises(ValueError, match="groups=3"):
        whiten_(nn.Conv2d(3, 6, 3, groups=3), images(c=3))
    with pytest.raises(ValueError, match="n_patches=26 < d = C\\*k\\*k = 27"):
        whiten_(nn.Conv2d(3, 4, 3), images(c=3), n_patches=26)


@pytest.mark.parametrize("channels", [1, 3])
def test_simple_resnets_stem_is_whitened_and_nothing_else_changes(channels):
    model = simple_resnet(10, in_channels=channels, widths=(8, 16))
    normalize, conv = simple_resnet_stem(model)
    assert conv is model.layer_groups[0][1][0] and isinstance(conv, nn.Conv2d)
    x = images(n=16, c=channels)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    whiten_(conv, x, normalize=normalize, eps=0.0, n_patches=3000, generator=seeded())
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["layer_groups.0.1.0.weight"]
    # the covariance is that of the normalised patches: the stem's own input
    d = min(conv.out_channels, channels * 9)
    out = outputs_on_patches(conv, x, 3000, normalize=normalize)[:, :d]
    torch.testing.assert_close(torch.cov(out.T, correction=0), torch.eye(d, dtype=out.dtype),
                               atol=2e-4, rtol=0)
    loss = F.cross_entropy(model(x), torch.arange(16) % 10)
    loss.backward()
    assert loss.isfinite() and conv.weight.grad is None  # frozen: no gradient, no SGD step
    assert all(p.grad is not None for n, p in model.named_parameters() if p is not conv.weight)
