"""Per-patch augmentation of the kept patches (ips.data.augment)."""

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from ips.config import AugmentConfig
from ips.data.augment import (
    HED_FROM_RGB,
    RGB_FROM_HED,
    PatchAugment,
    apply_symmetry,
    build_augment,
    hed_jitter,
    shift_patches,
)

ALL_ON = AugmentConfig(
    flips=True, shift=2, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, hed=0.05
)


def random_patches(n: int, channels: int = 3, size: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)


def pinkish_patches(n: int, size: int = 8) -> torch.Tensor:
    """H&E-like pink with a little texture, (n, 3, P, P)."""
    g = torch.Generator().manual_seed(1)
    colour = torch.tensor([215.0, 140.0, 185.0])[None, :, None, None]
    noise = torch.randint(-10, 11, (n, 3, size, size), generator=g)
    return (colour + noise).clamp(0, 255).to(torch.uint8)


def eight_symmetries(patch: torch.Tensor) -> list[torch.Tensor]:
    """The dihedral group of the square from flips and a transpose, (C, P, P) each."""
    t = patch.transpose(-1, -2)
    return [
        patch,
        patch.flip(-1),
        patch.flip(-2),
        patch.flip(-1).flip(-2),
        t,
        t.flip(-1),
        t.flip(-2),
        t.flip(-1).flip(-2),
    ]


def which_symmetry(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    return [i for i, s in enumerate(eight_symmetries(before)) if torch.equal(s, after)]


def test_apply_symmetry_codes_are_the_8_distinct_symmetries_of_the_square():
    patch = random_patches(1)[0]
    found = [which_symmetry(patch, apply_symmetry(patch[None], code)[0]) for code in range(8)]
    assert all(len(f) == 1 for f in found)
    assert sorted(f[0] for f in found) == list(range(8))


def test_flips_give_each_patch_one_of_its_8_symmetries_drawn_independently():
    patches = random_patches(64)
    out = PatchAugment(AugmentConfig(flips=True), channels=3)(
        patches, torch.Generator().manual_seed(0)
    )
    found = [which_symmetry(p, o) for p, o in zip(patches, out, strict=True)]
    assert all(len(f) == 1 for f in found)  # random pixels: the 8 symmetries all differ
    assert len({f[0] for f in found}) >= 6  # 64 draws of 8 codes: nearly all occur


def test_flips_keep_the_multiset_of_pixel_values_of_each_patch():
    patches = random_patches(32, size=7)
    out = PatchAugment(AugmentConfig(flips=True), channels=3)(
        patches, torch.Generator().manual_seed(3)
    )
    assert torch.equal(out.flatten(1).sort(dim=1).values, patches.flatten(1).sort(dim=1).values)
    assert not torch.equal(out, patches)


def reflect_crops(patch: torch.Tensor, s: int) -> dict[tuple[int, int], torch.Tensor]:
    """Every (dy, dx) in [-s, s]^2 of a reflect-padded crop of one (C, H, W) patch."""
    _, height, width = patch.shape
    padded = torch.nn.functional.pad(patch[None].float(), (s, s, s, s), mode="reflect")[0]
    return {
        (dy, dx): padded[:, s + dy : s + dy + height, s + dx : s + dx + width].to(patch.dtype)
        for dy in range(-s, s + 1)
        for dx in range(-s, s + 1)
    }


def test_shift_patches_is_a_crop_of_torchs_reflect_padding_at_each_patchs_offset():
    patches = random_patches(5, channels=2, size=7)[..., :6]  # (5, 2, 7, 6), not square
    offsets = torch.tensor([[0, 0], [3, -2], [-3, 5], [5, 0], [-5, -5]])
    out = shift_patches(patches, offsets)
    assert out.shape == patches.shape and out.is_contiguous()
    for patch, (dy, dx), result in zip(patches, offsets.tolist(), out, strict=True):
        crops = reflect_crops(patch, 5)  # torch: padding < the side
        assert torch.equal(result, crops[(dy, dx)])
    assert torch.equal(out[0], patches[0])


def test_shift_moves_each_patch_by_its_own_offset_within_the_range():
    patches = random_patches(40, channels=1, size=9)
    out = PatchAugment(AugmentConfig(shift=2), channels=1)(
        patches, torch.Generator().manual_seed(0)
    )
    drawn = []
    for patch, result in zip(patches, out, strict=True):
        found = [k for k, crop in reflect_crops(patch, 2).items() if torch.equal(crop, result)]
        assert len(found) == 1  # random pixels: the 25 crops all differ
        drawn.append(found[0])
    assert len(set(drawn)) >= 12  # 40 draws of 25 offsets
    assert {dy for dy, _ in drawn} == {-2, -1, 0, 1, 2} == {dx for _, dx in drawn}


def test_a_shift_as_large_as_the_patch_side_raises_naming_the_key():
    augment = PatchAugment(AugmentConfig(shift=6), channels=3)
    with pytest.raises(
        ValueError, match=r"data\.augment\.shift must be smaller than the patch side 6"
    ):
        augment(random_patches(2, size=6))
    with pytest.raises(ValueError, match=r"data\.augment\.shift must be >= 0"):
        AugmentConfig(shift=-1)


def test_brightness_scales_a_mid_grey_patch_by_a_factor_in_range_different_per_patch():
    x = 0.3
    patches = torch.full((200, 1, 5, 5), 100, dtype=torch.uint8)  # 100 * 1.3 stays below 255
    out = PatchAugment(AugmentConfig(brightness=x), channels=1)(
        patches, torch.Generator().manual_seed(0)
    )
    factors = out.float().mean(dim=(1, 2, 3)) / 100  # (n,)
    assert factors.min() >= 1 - x - 0.01 and factors.max() <= 1 + x + 0.01
    assert factors.min() < 0.8 and factors.max() > 1.2  # the range is used, not one factor
    assert factors.std() > 0.1


@pytest.mark.parametrize(
    ("key", "x", "op"),
    [
        ("brightness", 0.4, TF.adjust_brightness),
        ("contrast", 0.4, TF.adjust_contrast),
        ("saturation", 0.4, TF.adjust_saturation),
        ("hue", 0.3, TF.adjust_hue),
    ],
)
def test_colour_jitter_is_torchvisions_op_with_each_patchs_own_drawn_factor(key, x, op):
    patches = random_patches(10, size=5)
    out = PatchAugment(AugmentConfig(**{key: x}), channels=3)(
        patches, torch.Generator().manual_seed(4)
    )
    low, high = (-x, x) if key == "hue" else (1 - x, 1 + x)
    factors = low + (high - low) * torch.rand(10, generator=torch.Generator().manual_seed(4))
    expected = torch.stack([op(p, f) for p, f in zip(patches, factors.tolist(), strict=True)])
    assert out.shape == patches.shape and out.dtype == torch.uint8
    assert torch.equal(out, expected)
    assert not torch.equal(out, patches)
    assert len({o.float().mean().item() for o in out}) > 5  # factors differ between patches


def test_saturation_and_hue_leave_grey_valued_rgb_patches_unchanged():
    values = torch.arange(0, 256, 5, dtype=torch.uint8)  # greys from black to white
    patches = values[None, None, None, :].expand(4, 3, 2, -1).contiguous()  # R = G = B
    augment = PatchAugment(AugmentConfig(saturation=0.8, hue=0.5), channels=3)
    out = augment(patches, torch.Generator().manual_seed(0))
    assert (out.int() - patches.int()).abs().max() <= 1  # torchvision's grey weights sum to 0.9999


def test_an_op_with_range_0_is_skipped_and_leaves_the_patch_unchanged():
    patches = random_patches(4)
    out = PatchAugment(AugmentConfig(saturation=0.0), channels=3)(patches)
    assert torch.equal(out, patches) and out.data_ptr() != patches.data_ptr()
    with_hue = PatchAugment(AugmentConfig(hue=0.1), channels=3)
    with_hue_and_no_saturation = PatchAugment(AugmentConfig(hue=0.1, saturation=0.0), channels=3)
    assert torch.equal(
        with_hue(patches, torch.Generator().manual_seed(2)),
        with_hue_and_no_saturation(patches, torch.Generator().manual_seed(2)),
    )


def test_hed_matrices_are_skimages_and_each_others_inverse():
    color = pytest.importorskip("skimage.color")
    np.testing.assert_allclose(np.array(RGB_FROM_HED), color.rgb_from_hed, rtol=0, atol=1e-15)
    np.testing.assert_allclose(np.array(HED_FROM_RGB), color.hed_from_rgb, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.array(HED_FROM_RGB) @ RGB_FROM_HED, np.eye(3), atol=1e-12)


def test_hed_jitter_with_alpha_1_and_beta_0_returns_the_input_incl_black_and_white():
    patches = random_patches(6, size=9)
    patches[0] = 0  # pure black
    patches[1] = 255  # pure white
    patches[2, :, :3] = 0
    patches[2, :, 3:6] = 255
    patches[3, 0] = 0  # black in one channel only
    patches[4, 2] = 255  # saturated in one channel only
    out = hed_jitter(patches, torch.ones(6, 3), torch.zeros(6, 3))
    assert out.shape == patches.shape and out.dtype == torch.uint8
    assert (out.int() - patches.int()).abs().max() <= 1


def test_hed_jitter_equals_a_numpy_restatement_of_colour_deconvolution():
    color = pytest.importorskip("skimage.color")
    patches = pinkish_patches(3)
    patches[:, :, 0] = 0  # black: density of log(1e-6), as skimage
    patches[:, :, 1] = 255  # white: no stain
    g = torch.Generator().manual_seed(0)
    alpha = 0.5 + torch.rand(3, 3, generator=g)
    beta = -0.3 + 0.6 * torch.rand(3, 3, generator=g)
    rgb = patches.permute(0, 2, 3, 1).double().numpy() / 255  # (n, P, P, 3)
    stains = -np.log(np.maximum(rgb, 1e-6)) @ np.linalg.inv(color.rgb_from_hed)
    stains = stains * alpha.double().numpy()[:, None, None] + beta.double().numpy()[:, None, None]
    expected = np.clip(np.round(255 * np.exp(-stains @ color.rgb_from_hed)), 0, 255)
    out = hed_jitter(patches, alpha, beta).permute(0, 2, 3, 1).int().numpy()
    assert np.abs(out - expected).max() <= 1


def test_hed_jitter_adds_haematoxylin_as_blue_purple_and_eosin_as_pink():
    patch = torch.full((1, 3, 4, 4), 200, dtype=torch.uint8)
    ones = torch.ones(1, 3)
    more_h = hed_jitter(patch, ones, torch.tensor([[0.3, 0.0, 0.0]])).float().mean(dim=(2, 3))[0]
    more_e = hed_jitter(patch, ones, torch.tensor([[0.0, 0.3, 0.0]])).float().mean(dim=(2, 3))[0]
    assert more_h[0] < more_h[2] < 200  # haematoxylin absorbs red and green more than blue
    assert more_e[1] < more_e[2] < more_e[0] < 200  # eosin absorbs green most, red least


def test_hed_jitter_changes_a_pinkish_patch_differently_per_patch():
    patches = pinkish_patches(16)
    out = PatchAugment(AugmentConfig(hed=0.1), channels=3)(
        patches, torch.Generator().manual_seed(0)
    )
    change = (out.float() - patches.float()).abs().mean(dim=(1, 2, 3))  # (n,)
    assert (change > 1).float().mean() > 0.8
    assert out.float().mean(dim=(2, 3)).std(dim=0).min() > 1  # patches got different stains


@pytest.mark.parametrize("key", ["saturation", "hue", "hed"])
def test_grey_patches_with_a_colour_augmentation_raise_naming_the_key(key):
    with pytest.raises(ValueError, match=rf"data\.augment\.{key}.*grey patches have no colour"):
        PatchAugment(AugmentConfig(**{key: 0.1}), channels=1)


def test_grey_patches_accept_flips_brightness_and_contrast():
    augment = PatchAugment(AugmentConfig(flips=True, brightness=0.2, contrast=0.2), channels=1)
    out = augment(random_patches(5, channels=1), torch.Generator().manual_seed(0))
    assert out.shape == (5, 1, 6, 6) and out.dtype == torch.uint8


def test_patches_of_the_wrong_shape_or_dtype_raise_saying_what_was_expected():
    augment = PatchAugment(AugmentConfig(flips=True), channels=3)
    with pytest.raises(ValueError, match=r"\(n, 3, P, P\) uint8, got \(2, 1, 4, 4\)"):
        augment(random_patches(2, channels=1, size=4))
    with pytest.raises(ValueError, match="float32"):
        augment(random_patches(2).float())
    with pytest.raises(ValueError, match="square"):
        augment(random_patches(2)[..., :5])


def test_build_augment_returns_none_when_nothing_is_on():
    assert build_augment(AugmentConfig(), channels=3) is None
    assert isinstance(build_augment(AugmentConfig(flips=True), channels=1), PatchAugment)


def test_the_same_generator_seed_gives_the_same_output_and_another_seed_another():
    patches = random_patches(12)
    augment = PatchAugment(ALL_ON, channels=3)
    first = augment(patches, torch.Generator().manual_seed(7))
    again = augment(patches, torch.Generator().manual_seed(7))
    other = augment(patches, torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_without_a_generator_draws_come_from_torchs_global_rng():
    patches = random_patches(12)
    augment = PatchAugment(ALL_ON, channels=3)
    torch.manual_seed(5)
    first = augment(patches)
    torch.manual_seed(5)
    assert torch.equal(first, augment(patches))


def test_the_input_is_left_unchanged_and_a_channels_last_input_gives_the_same_result():
    patches = random_patches(12)
    before = patches.clone()
    augment = PatchAugment(ALL_ON, channels=3)
    out = augment(patches, torch.Generator().manual_seed(0))
    channels_last = patches.to(memory_format=torch.channels_last)
    out_cl = augment(channels_last, torch.Generator().manual_seed(0))
    assert torch.equal(patches, before) and torch.equal(channels_last, before)
    assert torch.equal(out, out_cl) and out_cl.is_contiguous()
    flipped = PatchAugment(AugmentConfig(flips=True), channels=3)(channels_last)
    assert flipped.is_contiguous() and torch.equal(channels_last, before)


def test_an_empty_set_of_patches_comes_back_empty():
    out = PatchAugment(ALL_ON, channels=3)(torch.zeros(0, 3, 4, 4, dtype=torch.uint8))
    assert out.shape == (0, 3, 4, 4)
