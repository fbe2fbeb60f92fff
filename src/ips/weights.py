"""Weight files, read as data and loaded strictly.

``read_state_dict("uni.bin")`` reads ``.safetensors`` (safetensors) or ``.bin`` / ``.pth`` /
``.pt`` / ``.ckpt`` (``torch.load(weights_only=True)``: tensors and plain data only, never
code), unwraps the usual nesting (``{"state_dict": ...}``, ``{"model": ...}``, ...) and strips
key prefixes that every key shares (``module.``, ``backbone.``, ...). ``load_strict`` then
loads it into a module and fails, naming the file, the model and the first offending key, on a
missing key, an unexpected key or a shape that does not fit: weights that load partly give
wrong features without any error, the worst failure a feature extractor can have.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ips.errors import InputError, MissingExtraError, MissingFileError

log = logging.getLogger(__name__)

NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module", "teacher", "student")
PREFIXES = ("module.", "backbone.", "model.", "encoder.", "trunk.", "base_model.")
TORCH_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")


def read_state_dict(
    path: str | os.PathLike, *, prefixes: Iterable[str] = PREFIXES, option: str = "weights"
) -> dict[str, Tensor]:
    """The tensors of a weight file, unwrapped and without a shared key prefix.

    Args:
        path: ``.safetensors``, ``.bin``, ``.pth``, ``.pt`` or ``.ckpt``.
        prefixes: key prefixes to strip when every key has the same one (repeatedly, so
            ``module.backbone.`` goes too).
        option: the setting that named the file, for errors (``model.pretrained``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line naming the file: unreadable, a pickle that holds more than
            tensors and plain data (refused: unpickling could run code), or no tensors.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise MissingFileError(f"{option}: weights file {file} not found")
    if file.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise MissingExtraError(
                f"{option}: {file.name} needs safetensors: pip install safetensors"
            ) from err
        try:
            state: Any = load_file(str(file), device="cpu")
        except Exception as err:
            raise InputError(
                f"{option}: cannot read {file} as safetensors ({_first(err)})"
            ) from None
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise InputError(
                f"{option}: {file} holds more than tensors and plain data; refused, since "
                "unpickling it could run code"
            ) from None
        except Exception as err:
            raise InputError(f"{option}: cannot read {file} as weights ({_first(err)})") from None
    state = _unwrap(state)
    if not isinstance(state, Mapping) or not any(isinstance(v, Tensor) for v in state.values()):
        raise InputError(f"{option}: {file} holds no state dict of tensors")
    return strip_prefixes({k: v for k, v in state.items() if isinstance(v, Tensor)}, prefixes)


def _unwrap(state: Any) -> Any:
    """``{"state_dict": {...}}`` and the like -> the inner mapping of tensors."""
    for _ in range(3):  # e.g. {"model": {"state_dict": ...}}
        if not isinstance(state, Mapping) or any(isinstance(v, Tensor) for v in state.values()):
            return state
        inner = next((state[k] for k in NESTED_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            return state
        state = inner
    return state


def strip_prefixes(state: Mapping[str, Tensor], prefixes: Iterable[str]) -> dict[str, Tensor]:
    """Remove a prefix that every key has, as long as one does."""
    state, prefixes = dict(state), tuple(prefixes)
    while state:
        shared = next((p for p in prefixes if all(k.startswith(p) for k in state)), None)
        if shared is None:
            break
        state = {k[len(shared) :]: v for k, v in state.items()}
    return state


def mismatches(
    expected: Mapping[str, Tensor], found: Mapping[str, Tensor], *, ignore: Iterable[str] = ()
) -> list[str]:
    """Every difference between the state dict a module has and one read from a file: a key
    it lacks, a key it does not have, a shape that differs. Keys starting with an ``ignore``
    prefix may be absent or extra (e.g. a classifier head the trunk drops)."""
    ignore = tuple(ignore)
    problems = [f"{k} is missing" for k in expected if k not in found]
    problems += [
        f"{k} is unexpected (not part of the model)"
        for k in found
        if k not in expected and not k.startswith(ignore)
    ]
    problems += [
        f"{k} has shape {tuple(found[k].shape)}, the model has {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and found[k].shape != v.shape
    ]
    return problems


def load_strict(
    module: nn.Module,
    state: Mapping[str, Tensor],
    *,
    source: str,
    model: str,
    ignore: Iterable[str] = (),
    option: str = "weights",
) -> None:
    """Load ``state`` into ``module``; any missing, unexpected or misshapen key is an error.

    Args:
        module: what the weights are for.
        state: from `read_state_dict`.
        source: the file, for the error.
        model: the model's name, for the error.
        ignore: key prefixes allowed to be missing or extra.
        option: the setting that named the file.
    """
    ignore = tuple(ignore)
    problems = mismatches(module.state_dict(), state, ignore=ignore)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(
            f"{option}: {source} does not fit {model}: {problems[0]}{more}; "
            "expected a state dict of exactly this model"
        )
    names = set(module.state_dict())
    module.load_state_dict({k: v for k, v in state.items() if k in names}, strict=False)


def _first(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:200] or type(err).__name__).rstrip(".")
