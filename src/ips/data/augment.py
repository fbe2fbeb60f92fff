"""Random changes to the M kept patches of the gradient pass, training only.

Iterative Patch Selection looks at all N patches of an image twice: a no-grad selection pass
that keeps the M best-scoring ones, then a gradient pass that encodes those M again. Only the
second pass sees augmented patches; selection and evaluation see the patches as they are, so the
same image keeps the same M patches whatever the augmentation draws.

Letters: n patches handed over at once (B * M kept patches of a batch), C channels (1 or 3),
P patch side.

    patches (n, C, P, P) uint8, any device
      -> flips           one of the 8 symmetries of the square per patch (exact, no resampling)
      -> shift           content moved by up to `shift` pixels per axis, border mirrored
      -> brightness      torchvision ColorJitter ops, each patch its own factor,
      -> contrast        in this fixed order
      -> saturation      (RGB only)
      -> hue             (RGB only)
      -> hed             H&E stain jitter after colour deconvolution (RGB only)
    -> (n, C, P, P) uint8, same device, contiguous, never the caller's tensor

All parameters are drawn on the CPU, from the given generator or else torch's global RNG, in the
order above, then moved to the patches' device: the same seed gives the same output anywhere.
"""

from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from ips.config import AugmentConfig
from ips.errors import InputError

# Ruifrok & Johnston (2001) stain vectors, one row per stain (haematoxylin, eosin, DAB), as in
# skimage.color.rgb_from_hed; HED_FROM_RGB is its inverse (skimage.color.hed_from_rgb).
RGB_FROM_HED = (
    (0.65, 0.70, 0.29),
    (0.07, 0.99, 0.11),
    (0.27, 0.57, 0.78),
)
HED_FROM_RGB = (
    (1.8779827368521356, -1.0076786862855642, -0.5561158181996246),
    (-0.06590806222356334, 1.1347303724996625, -0.13552179862837116),
    (-0.6019073634392891, -0.4804141884970579, 1.5735880719641926),
)
# skimage lifts intensities to 1e-6 before the log, so black pixels have a finite density
MIN_INTENSITY = 1e-6
# hed works on chunks of about this many pixel values, to bound its float32 intermediates
HED_CHUNK_VALUES = 2**24

_COLOUR_OPS = (
    ("brightness", TF.adjust_brightness),
    ("contrast", TF.adjust_contrast),
    ("saturation", TF.adjust_saturation),
    ("hue", TF.adjust_hue),
)
_RGB_ONLY = ("saturation", "hue", "hed")


def apply_symmetry(patches: Tensor, code: int) -> Tensor:
    """One of the 8 symmetries of the square, the same for every patch.

    Args:
        patches: (n, C, P, P).
        code: 0..7; rotate by (code % 4) quarter turns, then mirror left-right if code >= 4.

    Returns:
        (n, C, P, P), a new tensor.
    """
    out = torch.rot90(patches, code % 4, dims=(-2, -1))
    return out.flip(-1) if code >= 4 else out


def shift_patches(patches: Tensor, offsets: Tensor) -> Tensor:
    """Move each patch's content by its own offset, the border mirrored.

    Output pixel (y, x) of patch i is input pixel (y + dy_i, x + dx_i), where a coordinate
    outside [0, P) is mirrored back without repeating the edge (-1 -> 1, P -> P - 2), as
    ``torch.nn.functional.pad(mode="reflect")`` does; any dtype, no resampling.

    Args:
        patches: (n, C, H, W).
        offsets: (n, 2) integers (dy, dx) on the patches' device, |dy| < H and |dx| < W.

    Returns:
        (n, C, H, W), a new contiguous tensor.
    """
    n, channels, height, width = patches.shape
    device = patches.device

    def mirrored(size: int, offset: Tensor) -> Tensor:  # (n,) -> (n, size) source coordinates
        index = offset[:, None] + torch.arange(size, device=device)[None, :]  # (n, size)
        index = index.abs()  # -k -> k
        # size - 1 + k -> size - 1 - k
        return torch.where(index >= size, 2 * (size - 1) - index, index)

    rows = mirrored(height, offsets[:, 0])  # (n, H)
    cols = mirrored(width, offsets[:, 1])  # (n, W)
    i = torch.arange(n, device=device)[:, None, None, None]  # (n, 1, 1, 1)
    c = torch.arange(channels, device=device)[None, :, None, None]  # (1, C, 1, 1)
    return patches[i, c, rows[:, None, :, None], cols[:, None, None, :]].contiguous()


def hed_jitter(patches: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """Scale and shift each stain's amount in the HED colour-deconvolution space.

    Optical density -log(I) (I in [1e-6, 1] as in skimage) is unmixed into haematoxylin, eosin
    and DAB amounts, each becomes ``amount * alpha + beta``, and the result is mixed back, clipped
    and rounded. Amounts are in optical-density units (skimage's ``rgb2hed`` times -log(1e-6));
    unlike skimage they are not clipped at 0, so alpha = 1, beta = 0 returns every colour as it
    was (within 1 grey level), not only the colours the three stains can mix.

    Args:
        patches: (n, 3, P, P) uint8 RGB.
        alpha: (n, 3) scale per patch and stain (H, E, DAB).
        beta: (n, 3) shift per patch and stain, in optical density.

    Returns:
        (n, 3, P, P) uint8, a new contiguous tensor.
    """
    if patches.ndim != 4 or patches.shape[1] != 3 or patches.dtype != torch.uint8:
        raise InputError(
            f"hed_jitter needs RGB patches (n, 3, P, P) uint8, "
            f"got {tuple(patches.shape)} {patches.dtype}"
        )
    n, _, height, width = patches.shape
    if alpha.shape != (n, 3) or beta.shape != (n, 3):
        raise InputError(
            f"alpha and beta must be ({n}, 3), one value per patch and stain, "
            f"got {tuple(alpha.shape)} and {tuple(beta.shape)}"
        )
    kw = {"dtype": torch.float32, "device": patches.device}
    to_hed = torch.tensor(HED_FROM_RGB, **kw)  # (3, 3), rows R, G, B
    to_rgb = torch.tensor(RGB_FROM_HED, **kw)  # (3, 3), rows H, E, DAB
    alpha, beta = alpha.to(**kw), beta.to(**kw)  # (n, 3) each
    # unmix, scale and shift, remix is one affine map of the densities per patch:
    # density @ to_hed @ diag(alpha) @ to_rgb + beta @ to_rgb
    mix = to_hed @ (alpha[:, :, None] * to_rgb)  # (n, 3, 3)
    shift = beta @ to_rgb  # (n, 3)
    intensity = patches.reshape(n, 3, height * width).float()  # (n, 3, P * P)
    density = intensity.div_(255).clamp_min_(MIN_INTENSITY).log_().neg_()  # (n, 3, P * P)
    density = torch.baddbmm(shift[:, :, None], mix.transpose(1, 2), density)  # (n, 3, P * P)
    rgb = density.neg_().exp_().mul_(255)  # a density below 0 would pass 255: clip
    return rgb.round_().clamp_(0, 255).to(torch.uint8).view(n, 3, height, width)


class PatchAugment:
    """Per-patch flips, shifts, colour jitter and H&E stain jitter for the kept patches of
    training.

    Ops run in a fixed order: flips, shift, brightness, contrast, saturation, hue, hed; an op
    whose range is 0 is skipped and draws nothing. A shift draws the offsets (dy, dx) uniformly
    from the integers in [-shift, shift] per patch; output pixel (y, x) is input pixel
    (y + dy, x + dx), mirrored at the border without repeating the edge (torchvision's
    ``RandomCrop(P, padding=shift, padding_mode="reflect")``, a draw per patch).
    Brightness, contrast and saturation factors are uniform in [max(0, 1 - x), 1 + x], the hue
    shift in [-hue, hue] (torchvision ColorJitter's ranges, but a separate draw per patch and a
    fixed order instead of a random one); hed draws alpha ~ U[1 - x, 1 + x] and
    beta ~ U[-x, x] per patch and stain (see ``hed_jitter``).

    Args:
        config: which augmentations, and how strong.
        channels: C of the patches it will get, 1 (grey) or 3 (RGB).
    """

    def __init__(self, config: AugmentConfig, *, channels: int):
        if channels not in (1, 3):
            raise InputError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
        if channels == 1:
            for key in _RGB_ONLY:
                if getattr(config, key) > 0:
                    raise InputError(
                        f"data.augment.{key} needs RGB patches (3 channels), got 1 channel: "
                        f"grey patches have no colour; set data.augment.{key} to 0"
                    )
        self.config, self.channels = config, channels

    def __repr__(self) -> str:
        return f"PatchAugment({self.config}, channels={self.channels})"

    def __call__(self, patches: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment each patch with its own random parameters.

        Args:
            patches: (n, C, P, P) uint8 on any device, any memory format; left unchanged.
            generator: a CPU generator for every draw; None: torch's global RNG.

        Returns:
            (n, C, P, P) uint8 on the same device, contiguous, a new tensor.
        """
        self._check(patches, generator)
        out = patches.contiguous()  # (n, C, P, P); every op below writes a new tensor
        n = out.shape[0]
        if n == 0 or not self.config.active:
            return out.clone()  # the caller's tensor is never handed back
        if self.config.flips:
            out = self._flip(out, torch.randint(8, (n,), generator=generator))
        if self.config.shift > 0:
            s = self.config.shift
            offsets = torch.randint(-s, s + 1, (n, 2), generator=generator)  # (n, 2) dy, dx
            out = shift_patches(out, offsets.to(out.device))
        for key, op in _COLOUR_OPS:
            x = getattr(self.config, key)
            if x > 0:
                low, high = (-x, x) if key == "hue" else (max(0.0, 1.0 - x), 1.0 + x)
                values = _uniform(low, high, (n,), generator)  # (n,) one factor per patch
                pairs = zip(out, values.tolist(), strict=True)
                out = torch.stack([op(patch, value) for patch, value in pairs])
        if self.config.hed > 0:
            x = self.config.hed
            alpha = _uniform(1.0 - x, 1.0 + x, (n, 3), generator).to(out.device)  # (n, 3)
            beta = _uniform(-x, x, (n, 3), generator).to(out.device)  # (n, 3)
            out = self._hed(out, alpha, beta)
        return out

    def _check(self, patches: Tensor, generator: torch.Generator | None) -> None:
        if patches.ndim != 4 or patches.shape[1] != self.channels or patches.dtype != torch.uint8:
            raise InputError(
                f"patches must be (n, {self.channels}, P, P) uint8, "
                f"got {tuple(patches.shape)} {patches.dtype}"
            )
        if self.config.flips and patches.shape[-1] != patches.shape[-2]:
            raise InputError(f"flips need square patches (n, C, P, P), got {tuple(patches.shape)}")
        if self.config.shift >= min(patches.shape[-2:]):
            raise InputError(
                f"data.augment.shift must be smaller than the patch side "
                f"{min(patches.shape[-2:])} (a mirrored border), got {self.config.shift}"
            )
        if generator is not None and generator.device.type != "cpu":
            raise InputError(f"generator must be a CPU torch.Generator, got {generator.device}")

    @staticmethod
    def _flip(patches: Tensor, codes: Tensor) -> Tensor:
        # one rot90 / flip per symmetry that occurs (at most 8), not one per patch
        out = torch.empty_like(patches)  # (n, C, P, P)
        for code in codes.unique().tolist():
            ids = (codes == code).nonzero().squeeze(1).to(patches.device)  # patches with this code
            out[ids] = apply_symmetry(patches[ids], code)
        return out

    @staticmethod
    def _hed(patches: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
        # chunks bound the float32 intermediates (4 bytes a value, several alive at once)
        size = max(1, HED_CHUNK_VALUES // math.prod(patches.shape[1:]))
        chunks = zip(patches.split(size), alpha.split(size), beta.split(size), strict=True)
        return torch.cat([hed_jitter(p, a, b) for p, a, b in chunks])


def _uniform(
    low: float, high: float, shape: tuple[int, ...], generator: torch.Generator | None
) -> Tensor:
    """Uniform draws in [low, high] on the CPU, float32."""
    return low + (high - low) * torch.rand(shape, generator=generator)


def build_augment(config: AugmentConfig, *, channels: int) -> PatchAugment | None:
    """The augmentation for patches with C = channels; None when nothing is on."""
    return PatchAugment(config, channels=channels) if config.active else None
