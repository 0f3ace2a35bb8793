"""The batched GPU augmentations against torchvision's functional ops on the CPU."""
import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

import datasets


@pytest.fixture
def images():
    return torch.rand(6, 3, 20, 24)  # float images in [0, 1], not square on purpose


def test_resized_crop_matches_torchvision(images):
    top, left = torch.tensor([0., 3, 5, 1, 8, 1]), torch.tensor([0., 1, 7, 4, 10, 0])
    h, w = torch.tensor([20., 9, 11, 6, 12, 19]), torch.tensor([24., 12, 10, 8, 14, 5])
    ours = datasets.resized_crop(images, top, left, h, w, size=24)
    for i in range(len(images)):
        ref = TF.resized_crop(images[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [24, 24], antialias=False)
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=0)


def test_flip_mirrors_the_crop(images):
    top, left, h, w = torch.tensor([2.] * 6), torch.tensor([3.] * 6), torch.tensor([10.] * 6), torch.tensor([12.] * 6)
    flip = torch.tensor([True, False, True, False, True, False])
    ours = datasets.resized_crop(images, top, left, h, w, 16, flip)
    plain = datasets.resized_crop(images, top, left, h, w, 16)
    torch.testing.assert_close(ours[flip], plain[flip].flip(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours[~flip], plain[~flip])


def test_crop_boxes_follow_random_resized_crop_rules():
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    top, left, h, w = datasets.sample_crops(4000, 32, 32, scale, ratio, "cpu")
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = h * w / 32 ** 2
    # Rounding h and w to pixels moves the area and aspect slightly outside the sampled ranges.
    assert area.min() > 0.2 * 0.8 and area.max() <= 1.0
    aspect = w / h
    assert aspect.min() > 3 / 4 * 0.8 and aspect.max() < 4 / 3 * 1.25
    assert len(set(zip(top.tolist(), left.tolist(), h.tolist(), w.tolist()))) > 1000  # per-image draws
    assert abs(area.mean().item() - 0.6) < 0.05  # E[U(0.2, 1)] = 0.6


def test_crop_fallback_is_centre_crop():
    # An impossible scale (> 1) forces torchvision's fallback: the whole image.
    top, left, h, w = datasets.sample_crops(5, 16, 16, (2.0, 3.0), (3 / 4, 4 / 3), "cpu")
    assert (h == 16).all() and (w == 16).all() and (top == 0).all() and (left == 0).all()


@pytest.mark.parametrize("op,ref", [
    (datasets.adjust_brightness, TF.adjust_brightness),
    (datasets.adjust_contrast, TF.adjust_contrast),
    (datasets.adjust_saturation, TF.adjust_saturation),
])
def test_colour_ops_match_torchvision(images, op, ref):
    factors = torch.tensor([0.6, 0.9, 1.0, 1.2, 1.4, 0.0])
    ours = op(images, factors.view(-1, 1, 1, 1))
    for i, f in enumerate(factors.tolist()):
        torch.testing.assert_close(ours[i], ref(images[i], f), atol=1e-6, rtol=0)


def test_hue_matches_torchvision(images):
    shifts = torch.tensor([-0.1, -0.05, 0.0, 0.02, 0.1, 0.5])
    ours = datasets.adjust_hue(images, shifts.view(-1, 1, 1, 1))
    for i, s in enumerate(shifts.tolist()):
        torch.testing.assert_close(ours[i], TF.adjust_hue(images[i], s), atol=1e-5, rtol=0)


def test_hue_of_grey_pixels_is_unchanged():
    x = torch.rand(2, 1, 5, 5).expand(-1, 3, -1, -1)
    torch.testing.assert_close(datasets.adjust_hue(x, torch.full((2, 1, 1, 1), 0.3)), x)


def test_jitter_order_matches_sequential_torchvision(images):
    fb, fc, fs, fh = (torch.tensor(v).view(-1, 1, 1, 1).expand(6, 1, 1, 1)
                      for v in ([1.3], [0.7], [1.4], [0.08]))
    orders = torch.stack([torch.randperm(4) for _ in range(6)])
    ours = datasets.apply_jitter(images, fb, fc, fs, fh, orders)
    ops = [lambda im: TF.adjust_brightness(im, 1.3), lambda im: TF.adjust_contrast(im, 0.7),
           lambda im: TF.adjust_saturation(im, 1.4), lambda im: TF.adjust_hue(im, 0.08)]
    for i in range(6):
        ref = images[i]
        for op in orders[i].tolist():
            ref = ops[op](ref)
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=0)
    # Different orders give different images, so the order really is per image.
    assert len({tuple(o) for o in orders.tolist()}) > 1


def test_grey_matches_torchvision(images):
    torch.testing.assert_close(datasets.grey(images), TF.rgb_to_grayscale(images), atol=1e-6, rtol=0)


def test_blur_matches_torchvision():
    x = torch.rand(3, 3, 64, 64)
    sigma = torch.tensor([0.1, 0.8, 2.0])
    ours = datasets.gaussian_blur(x, sigma, 7)
    for i, s in enumerate(sigma.tolist()):
        torch.testing.assert_close(ours[i], TF.gaussian_blur(x[i], [7, 7], [s, s]), atol=1e-5, rtol=0)


def test_solarize_matches_torchvision(images):
    torch.testing.assert_close(datasets.solarize(images, 0.5), TF.solarize(images, 0.5))


def test_augment_draws_per_image_and_normalizes():
    x = (torch.rand(1, 3, 32, 32) * 255).to(torch.uint8).expand(64, -1, -1, -1)  # one image, 64 times
    aug = datasets.Augment(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    y = aug(x)
    assert y.shape == (64, 3, 32, 32) and y.dtype == torch.float32
    flat = y.flatten(1)
    distinct = torch.cdist(flat, flat) > 1e-3
    assert distinct[~torch.eye(64, dtype=torch.bool)].all()  # every pair of views differs
    assert y.min() >= (0 - 0.5) / 0.25 - 1e-5 and y.max() <= (1 - 0.5) / 0.25 + 1e-5


def test_augment_identity_recipe_is_exact():
    x = (torch.rand(4, 3, 16, 16) * 255).to(torch.uint8)
    aug = datasets.Augment(16, (0.0,) * 3, (1.0,) * 3, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0,
                         jitter_p=0, grey_p=0, blur_p=0)
    torch.testing.assert_close(aug(x), x.float() / 255, atol=1e-6, rtol=0)


def test_grey_and_solarize_probabilities():
    x = (torch.rand(2000, 3, 8, 8) * 255).to(torch.uint8)
    aug = datasets.Augment(8, (0.0,) * 3, (1.0,) * 3, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0,
                         jitter_p=0, grey_p=0.2, blur_p=0)
    y = aug(x)
    is_grey = (y.max(dim=1).values - y.min(dim=1).values).flatten(1).max(dim=1).values < 1e-6
    assert abs(is_grey.float().mean().item() - 0.2) < 0.04
    assert math.isclose(aug.solarize_p, 0.0)
