import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import ViewPolicy
from pipeline.data.views import IDENTITY, apply_views, sample_views

KEYS = [f"sample-{i:04d}" for i in range(40)]
RAW = ((0.0,), (1.0 / 255.0,))  # mean/std that leave pixel values unchanged


def test_views_depend_only_on_seed_key_and_index() -> None:
    policy = ViewPolicy()
    whole = sample_views(KEYS, 6, policy, seed=3, image_size=8)
    assert np.array_equal(whole, sample_views(KEYS, 6, policy, seed=3, image_size=8))
    # any split into "workers", in any order, produces the same views
    parts = [sample_views(KEYS[i::3], 6, policy, seed=3, image_size=8) for i in (2, 0, 1)]
    for worker, part in zip((2, 0, 1), parts, strict=True):
        assert np.array_equal(part, whole[worker::3])
    # fewer views are a prefix of more views
    assert np.array_equal(sample_views(KEYS, 3, policy, seed=3, image_size=8), whole[:, :3])
    assert not np.array_equal(whole, sample_views(KEYS, 6, policy, seed=4, image_size=8))


def test_view_zero_is_identity_and_policies_stay_in_range() -> None:
    for kind in ("rrc", "pad_crop", "flip", "none"):
        views = sample_views(KEYS, 5, ViewPolicy(kind=kind), seed=0, image_size=8)
        assert np.array_equal(views[:, 0], np.tile(IDENTITY, (len(KEYS), 1)))
        assert np.all(views[..., 2] > views[..., 0]) and np.all(views[..., 3] > views[..., 1])
    rrc = sample_views(KEYS, 5, ViewPolicy(), seed=0, image_size=8)
    assert rrc[:, 1:, :4].min() >= 0 and rrc[:, 1:, :4].max() <= 1 and 0.2 < rrc[:, 1:, 4].mean() < 0.8


def test_view_zero_reproduces_the_plain_resized_image() -> None:
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    views = torch.tensor([IDENTITY] * 4)
    same = apply_views(images, views, 8, RAW[0] * 3, RAW[1] * 3)
    assert torch.equal(same, images.float())
    bigger = apply_views(images, views, 20, RAW[0] * 3, RAW[1] * 3)
    assert torch.allclose(
        bigger, F.interpolate(images.float(), size=20, mode="bilinear", align_corners=False), atol=1e-4
    )


def test_flip_view_equals_flipped_image_and_normalises() -> None:
    images = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    flipped = apply_views(images, torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0]] * 2), 8, (0.5,), (0.25,))
    assert torch.allclose(flipped, (images.float().flip(-1) / 255.0 - 0.5) / 0.25, atol=1e-5)


def test_pad_crop_shifts_by_whole_pixels() -> None:
    images = torch.randint(0, 256, (1, 1, 8, 8), dtype=torch.uint8)
    shifted = apply_views(images, torch.tensor([[-2 / 8, 0.0, 1 - 2 / 8, 1.0, 0.0]]), 8, *RAW)
    assert torch.equal(shifted[..., 2:], images.float()[..., :6])
    assert torch.equal(shifted[..., 0], torch.zeros_like(shifted[..., 0]))
