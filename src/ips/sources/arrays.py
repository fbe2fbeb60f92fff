"""Patches of an in-memory or memory-mapped array (numpy, np.memmap, torch tensor)."""

from __future__ import annotations

import mmap
import os
import threading
from typing import Any

import numpy as np

from ips.errors import InputError, MissingFileError

from .base import PatchSource, TissueSpec


def _is_tensor(array: Any) -> bool:
    return type(array).__module__.startswith("torch") and hasattr(array, "device")


class ArraySource(PatchSource):
    """A patch grid over an array of shape (H, W), (H, W, C) or (C, H, W).

    Layout: a 3-D array whose first dimension is 1 or 3 and whose last is larger is taken as
    channels-first, one whose last dimension is 1 or 3 and whose first is larger as
    channels-last; anything else needs `channels_last`. Values: uint8 or bool, or floats in
    [0, 1] (scaled to 0..255 on read). Patches are gathered by fancy indexing, so an np.memmap
    is read only where patches lie; a CPU tensor is viewed through numpy without a copy, a
    tensor on another device is indexed there and only the patches are copied over.

    Pixels outside the array (only `read_region` can ask for them) are 0.

    Args:
        array: the image.
        patch_size: P.
        stride: S, default P.
        channels_last: layout, when it cannot be guessed.
        name: used in error messages.
        mpp: microns per pixel, if known.
        tissue: None, "otsu", a mask array or a mask image / GeoJSON path.
        min_tissue: lowest tissue fraction of a kept patch.
    """

    def __init__(
        self,
        array: Any,
        *,
        patch_size: int,
        stride: int | None = None,
        channels_last: bool | None = None,
        name: str = "array",
        mpp: float | None = None,
        tissue: TissueSpec = None,
        min_tissue: float = 0.01,
    ) -> None:
        self.name = name
        self.mpp = mpp
        self.background = 0
        self._tensor = None
        if _is_tensor(array):
            tensor = array.detach()
            try:  # a CPU tensor of a numpy dtype: a view, no copy
                array = tensor.numpy() if tensor.device.type == "cpu" else None
            except TypeError:
                array = None
            if array is None:
                self._tensor = tensor
        else:
            array = np.asarray(array) if not isinstance(array, np.ndarray) else array
        ref = self._tensor if self._tensor is not None else array
        shape = tuple(ref.shape)
        dtype = str(ref.dtype).replace("torch.", "")
        if dtype not in ("uint8", "bool") and not dtype.startswith(("float", "bfloat")):
            raise InputError(f"{name}: array must be uint8, bool or float in [0, 1], got {dtype}")
        self._float = dtype.startswith(("float", "bfloat"))
        self._bool = dtype == "bool"
        if len(shape) == 2:
            self._layout = "hw"
            height, width, channels = shape[0], shape[1], 1
        elif len(shape) == 3:
            if channels_last is None:
                if shape[0] in (1, 3) and shape[-1] > shape[0]:
                    channels_last = False
                elif shape[-1] in (1, 3) and shape[0] > shape[-1]:
                    channels_last = True
                else:
                    raise InputError(
                        f"{name}: cannot tell the channel axis of shape {shape}; "
                        "pass channels_last="
                    )
            self._layout = "hwc" if channels_last else "chw"
            if channels_last:
                height, width, channels = shape
            else:
                channels, height, width = shape
        else:
            raise InputError(f"{name}: array must be (H, W), (H, W, C) or (C, H, W), got {shape}")
        self._array = array
        self.channels = int(channels)
        self.level_dimensions = ((int(width), int(height)),)
        self.level_downsamples = (1.0,)
        self._lock = threading.RLock()
        self._opened_pid = None
        self._setup(patch_size=patch_size, stride=stride, tissue=tissue, min_tissue=min_tissue)

    # an np.memmap is pickled as its file and offset, not as its data
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        arr = self._array
        if isinstance(arr, np.memmap) and isinstance(arr.base, mmap.mmap) and arr.filename:
            order = "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
            state["_array"] = None
            state["_memmap"] = (arr.filename, arr.dtype.str, arr.shape, arr.offset, order)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        memmap = state.pop("_memmap", None)
        super().__setstate__(state)
        if memmap is not None:
            filename, dtype, shape, offset, order = memmap
            if not os.path.exists(filename):
                raise MissingFileError(f"{filename}: no such file (memory map of {self.name})")
            self._array = np.memmap(
                filename, dtype=dtype, mode="r", shape=shape, offset=offset, order=order
            )

    def _to_uint8(self, values: Any) -> np.ndarray:
        if self._tensor is not None:
            values = values.float().cpu().numpy() if self._float else values.cpu().numpy()
        values = np.asarray(values)
        if self._float:
            return np.clip(values.astype(np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        if self._bool:
            return values.astype(np.uint8) * 255
        return values

    def _gather(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Pixels at rows `ys` (n, h) and columns `xs` (n, w). Returns: uint8 (n, h, w, C)."""
        rows, cols = ys[:, :, None], xs[:, None, :]  # (n, h, 1), (n, 1, w)
        src = self._array
        if self._tensor is not None:
            import torch

            src = self._tensor
            rows = torch.as_tensor(rows, device=src.device)
            cols = torch.as_tensor(cols, device=src.device)
        if self._layout == "hw":
            values = src[rows, cols][..., None]
        elif self._layout == "hwc":
            values = src[rows, cols]
        else:
            values = src[:, rows, cols]  # (C, n, h, w)
            values = (
                values.permute(1, 2, 3, 0)
                if self._tensor is not None
                else values.transpose(1, 2, 3, 0)
            )
        return self._to_uint8(values)

    def read(self, ids: Any) -> np.ndarray:
        """Read patches. Args: ids: (n,) ints in [0, N). Returns: uint8 (n, C, P, P), in order."""
        ids = self._check_ids(ids)
        p = self.patch_size
        origins = self._origins_of(ids)  # (n, 2) (y, x)
        offsets = np.arange(p, dtype=np.int64)
        ys = origins[:, :1] + offsets  # (n, P)
        xs = origins[:, 1:] + offsets  # (n, P)
        patches = self._gather(ys, xs)  # (n, P, P, C)
        return np.ascontiguousarray(patches.transpose(0, 3, 1, 2))

    def _open(self) -> None:  # nothing to open: the array is the data
        pass

    def _release(self) -> None:
        pass

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        src = self._tensor if self._tensor is not None else self._array
        if self._layout == "hw":
            region = src[y : y + height, x : x + width][..., None]
        elif self._layout == "hwc":
            region = src[y : y + height, x : x + width]
        else:
            region = src[:, y : y + height, x : x + width]
            region = (
                region.permute(1, 2, 0) if self._tensor is not None else region.transpose(1, 2, 0)
            )
        return np.ascontiguousarray(self._to_uint8(region))
