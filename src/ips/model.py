"""IPSModel: select (no gradients) -> encode the kept patches -> pool -> task heads.

Letters: B images, N patches, M memory size, I chunk size, K = min(M, N) kept patches,
D embedding width, H heads, T query tokens (one per task).

Loading modes (``selection.loading``):
    eager: the whole batch is moved to the model's device first.
    eager_sequential: one image at a time is moved and selected; the selections are stacked,
        then one forward/backward runs over the batch.
    lazy: patches stay where they are (host memory or disk); only the first M and then each
        chunk of I are read and moved, and the K selected patches are read again.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ips.aggregation import CrossAttentionPool, selection_scores, sinusoidal_1d, sinusoidal_2d
from ips.config import (
    Config,
    ModelConfig,
    SelectionConfig,
    config_from_dict,
    config_to_dict,
    replace_fields,
)
from ips.encoders import FeatureProjector, create_encoder, weights_mismatch
from ips.errors import InputError, MissingFileError
from ips.files import atomic_write
from ips.heads import TaskHeads
from ips.selection import (
    AttentionScore,
    Observer,
    PatchStore,
    Selection,
    embed_valid,
    eval_mode,
    gather_patches,
    select_patches,
)

CHECKPOINT_FORMAT = "ips-checkpoint"
CHECKPOINT_VERSION = 1
CPU_ENCODER_BATCH = 64  # patches per no-gradient encoder call on a CPU by default
CPU_PROJECTOR_BATCH = 1024  # the same for the features projector (rows of a feature bag)


class IPSOutput(NamedTuple):
    """What a forward pass produces; the same fields every time.

    logits: task name -> logits ((B, classes), or (B,) for binary tasks).
    attention: (B, T, K) attention of each task's query on the kept patches, mean over heads.
    selected: (B, K) original indices of the kept patches, best selection score first.
    scores: (B, K) selection scores of the kept patches.
    mask: (B, K) True for real patches (False only where an image has fewer than K).
    """

    logits: dict[str, Tensor]
    attention: Tensor
    selected: Tensor
    scores: Tensor
    mask: Tensor


class IPSModel(nn.Module):
    """Iterative Patch Selection model.

    Args:
        model: architecture (encoder, pooling, heads).
        selection: memory size M, chunk size I, loading mode.
    """

    normalize_mean: Tensor | None  # (1, C, 1, 1) buffers of model.normalize_mean / _std
    normalize_std: Tensor | None

    def __init__(self, model: ModelConfig, selection: SelectionConfig | None = None):
        super().__init__()
        self.model_config = model
        self.selection_config = selection or SelectionConfig()
        self.encoder = create_encoder(
            model.encoder,
            in_channels=model.in_channels,
            embed_dim=model.embed_dim,
            pretrained=model.pretrained,
            feature_dim=model.feature_dim,
            grid=model.encoder_grid,
        )
        self.pool = CrossAttentionPool(
            embed_dim=model.embed_dim,
            num_heads=model.num_heads,
            head_dim=model.head_dim,
            mlp_dim=model.mlp_dim,
            num_queries=model.queries,
            dropout=model.dropout,
            query_std=model.query_std,
        )
        self.heads = TaskHeads(model.tasks, embed_dim=model.embed_dim)
        self.is_features = isinstance(self.encoder, FeatureProjector)
        if model.freeze_encoder:
            self._freeze_encoder()
        for key in ("normalize_mean", "normalize_std"):
            value = getattr(model, key)
            buffer = None if value is None else torch.tensor(value).view(1, -1, 1, 1)
            self.register_buffer(key, buffer, persistent=False)
        if model.channels_last and not self.is_features:
            self.encoder.to(memory_format=torch.channels_last)

    def _freeze_encoder(self) -> None:
        """No gradients for the encoder's trunk; its projection (``proj``, if any) trains."""
        if self.is_features:
            raise InputError(
                "model.freeze_encoder: the 'features' encoder is the trainable projection of "
                "precomputed features, there is no trunk to freeze"
            )
        self.encoder.requires_grad_(False)
        proj = getattr(self.encoder, "proj", None)
        if isinstance(proj, nn.Module):
            proj.requires_grad_(True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the encoder's activations in backward instead of keeping them
        (``train.activation_checkpointing``): the gradient pass then keeps, for its B x K
        patches, only the input of each encoder stage. Gradients, losses and BatchNorm
        statistics stay those without it (see `ips.encoders.checkpoint_stages`).

        A no-op for a frozen trunk (no activations are kept for it) and for the features
        encoder (one projection, whose activations are about the size of its input).

        Raises:
            InputError: the encoder cannot be checkpointed.
        """
        if self.is_features or self.model_config.freeze_encoder:
            return
        setter = getattr(self.encoder, "set_grad_checkpointing", None)
        if setter is None:
            raise InputError(
                f"train.activation_checkpointing: encoder {self.model_config.encoder!r} has no "
                "set_grad_checkpointing; set it to false"
            )
        setter(enable)

    def train(self, mode: bool = True) -> IPSModel:
        """Set train or eval mode; a frozen encoder stays in eval mode (its BatchNorm
        statistics stay those of its weights)."""
        super().train(mode)
        if self.model_config.freeze_encoder:
            self.encoder.eval()
        return self

    @property
    def config(self) -> Config:
        """Model and selection settings as a Config (data and train at their defaults)."""
        return Config(model=self.model_config, selection=self.selection_config)

    @property
    def tasks(self):
        return self.model_config.tasks

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- stages ---------------------------------------------------------------------------

    def embed(self, x: Tensor) -> Tensor:
        """Encode patches. uint8 pixels are scaled to [0, 1] and normalised; float input is
        taken as prepared.

        Args:
            x: (n, C, P, P) pixel patches, or (n, F) features.

        Returns:
            (n, D).
        """
        cfg = self.model_config
        if self.is_features:
            if x.dim() != 2 or x.shape[1] != cfg.feature_dim:
                raise InputError(
                    f"features must be (n, F={cfg.feature_dim}) per patch, got {tuple(x.shape)}"
                )
            return self.encoder(x.float())
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise InputError(
                f"patches must be (n, C={cfg.in_channels}, P, P) per patch, got {tuple(x.shape)}"
            )
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
            if self.normalize_mean is not None and self.normalize_std is not None:
                x = (x - self.normalize_mean) / self.normalize_std
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.encoder(x)

    def positional(self, ids: Tensor, positions: Tensor | None) -> Tensor | None:
        """Positional encodings (B, K, D) of patches, or None when the model uses none.

        Args:
            ids: (B, K) original raster indices.
            positions: (B, K, 2) (row, col) grid positions, needed for "2d".
        """
        kind, dim = self.model_config.pos_enc, self.model_config.embed_dim
        scale = self.model_config.pos_scale
        if kind == "1d":
            encoding = sinusoidal_1d(ids, dim)
        elif kind == "2d":
            if positions is None:
                raise InputError("model.pos_enc '2d' needs grid positions: pass grid_shape")
            encoding = sinusoidal_2d(positions[..., 0], positions[..., 1], dim)
        else:
            return None
        return encoding if scale == 1.0 else encoding * scale

    def forward_head(self, pooled: Tensor) -> dict[str, Tensor]:
        """(B, T, D) task tokens -> logits per task."""
        return self.heads(pooled)

    # ---- selection ------------------------------------------------------------------------

    def select(
        self,
        patches: Tensor | Sequence[Any],
        mask: Tensor | None = None,
        *,
        grid_shape: tuple[int, int] | None = None,
        generator: torch.Generator | None = None,
        observe: Observer | None = None,
    ) -> Selection:
        """Choose the K = min(M, N) best patches per image, without gradients, with every
        module in eval mode (previous modes restored afterwards).

        Args:
            patches: (B, N, ...) tensor or a sequence of B per-image containers.
            mask: (B, N) True for real patches of a padded tensor.
            grid_shape: (rows, cols) of the patch grid, for 2-D positional encodings.
            generator: random generator for the visiting order.
            observe: receives every scored candidate set (see ``select_patches``).

        Returns:
            Selection(ids, scores, mask), each (B, K).
        """
        sel = self.selection_config
        device = self.device
        patches, mask = self._place(patches, mask, device, sel.loading == "eager")

        def run(images: Tensor | Sequence[Any], image_mask: Tensor | None) -> Selection:
            folded = self.pool.folded_queries()  # once: the weights stay fixed here

            def logits(emb: Tensor, ids: Tensor) -> Tensor:
                # positions of `images`: one image at a time in eager_sequential mode
                pos = self.positional(ids, self._positions(ids, grid_shape, images))
                # added in float32: rounded to bf16 it shifts scores by ~0.2 % of their spread
                return self.pool.logits(emb if pos is None else emb.float() + pos, folded)

            return select_patches(
                images,
                encode=self.embed,
                # each patch's logits are computed once, when it is encoded
                score=AttentionScore(logits, combine=selection_scores),
                memory_size=sel.memory_size,
                chunk_size=sel.chunk_size,
                mask=image_mask,
                device=device,
                encoder_batch_size=self._encoder_batch_size(device),
                dedup=sel.dedup,
                distinct=sel.distinct,
                shuffle=sel.shuffle,
                generator=generator,
                observe=observe,
            )

        with torch.inference_mode(), eval_mode(self):
            if sel.loading != "eager_sequential":
                result = run(patches, mask)
            else:
                parts = []
                for b in range(len(patches)):
                    image = patches[b : b + 1] if isinstance(patches, Tensor) else [patches[b]]
                    if isinstance(image, Tensor):
                        image = image.to(device)
                    parts.append(run(image, None if mask is None else mask[b : b + 1]))
                result = _stack_selections(parts)
        return Selection(*(t.clone() for t in result))  # ordinary tensors, not inference ones

    # ---- forward --------------------------------------------------------------------------

    def forward(
        self,
        patches: Tensor | Sequence[Any],
        mask: Tensor | None = None,
        *,
        grid_shape: tuple[int, int] | None = None,
        generator: torch.Generator | None = None,
        observe: Observer | None = None,
        augment: Callable[[Tensor], Tensor] | None = None,
    ) -> IPSOutput:
        """Select, then encode the kept patches with gradients, pool and classify.

        Args:
            patches: (B, N, C, P, P) pixels or (B, N, F) features, as a tensor on any device
                or a sequence of B per-image containers (possibly of different N).
            mask: (B, N), True for real patches of a padded tensor; padded patches are never
                selected, never attended to and change no logit.
            grid_shape: (rows, cols), for 2-D positional encodings over a tensor batch.
            generator: random generator for the selection order.
            observe: receives every scored candidate set of the selection pass (see
                ``select_patches``); the pass then also runs when N <= M, to score every patch.
            augment: maps the kept raw patches (n, C, P, P) to changed ones before they are
                encoded with gradients (training-time augmentation; selection never sees it).

        Returns:
            IPSOutput.
        """
        device = self.device
        store = PatchStore(patches, mask)
        M = self.selection_config.memory_size
        selected_all = store.num_patches <= M and observe is None
        if selected_all:  # nothing to select: use every patch
            ids = torch.arange(store.num_patches).expand(store.batch_size, -1)
            selection = Selection(ids, torch.zeros(ids.shape), store.valid(ids))
        else:
            selection = self.select(
                patches, mask, grid_shape=grid_shape, generator=generator, observe=observe
            )
        raw = gather_patches(patches, selection, mask=mask, device=device)  # (n_valid, ...)
        if augment is not None:
            raw = augment(raw)
        valid = selection.mask.to(device)
        if self.encoder.training:  # batch statistics: the K patches of the batch together
            emb = embed_valid(self.embed, raw, selection.mask)  # (B, K, D), with gradients
        else:  # patches are independent: micro-batches and copies encoded once are exact
            emb = embed_valid(
                self.embed,
                raw,
                selection.mask,
                batch_size=self._encoder_batch_size(device),
                dedup=self.selection_config.dedup,
            )
        ids = selection.ids.to(device)
        pos = self.positional(ids, self._positions(ids, grid_shape, patches))
        if pos is not None:  # in float32, as for the selection scores
            emb = emb.float() + pos
        pooled, weights = self.pool(emb, valid)  # (B, T, D), (B, H, T, K)
        logits = self.forward_head(pooled)
        attention = weights.mean(1)  # (B, T, K)
        scores = selection.scores.to(device)
        if selected_all:  # no selection pass ran: report the pooling attention
            scores = attention.detach().mean(1).float()
        return IPSOutput(logits, attention, selection.ids, scores, selection.mask)

    def _positions(
        self, ids: Tensor, grid_shape: tuple[int, int] | None, patches: Tensor | Sequence[Any]
    ) -> Tensor | None:
        """(B, K, 2) grid positions of ids (B, K) for 2-D encodings; None otherwise."""
        if self.model_config.pos_enc != "2d":
            return None
        return _grid_positions(ids, grid_shape, patches)

    def _encoder_batch_size(self, device: torch.device) -> int | None:
        """Patches per encoder call without batch statistics: the configured number, else
        CPU_ENCODER_BATCH on a CPU (caches favour small batches: a ResNet-18 trunk on 50 x 50
        patches runs 2x faster in calls of 64 than of 1024, and calls of 64 are as fast as or
        up to 10 % faster than calls of 128; benchmarks/micro_batch), CPU_PROJECTOR_BATCH for
        the features projector (a matrix product: 1.2x the rows per second of calls of 64;
        benchmarks/features_speed.md), and whole chunks elsewhere."""
        size = self.selection_config.encoder_batch_size
        if size is None and device.type == "cpu":
            features = self.model_config.encoder == "features"
            return CPU_PROJECTOR_BATCH if features else CPU_ENCODER_BATCH
        return size

    @staticmethod
    def _place(
        patches: Tensor | Sequence[Any], mask: Tensor | None, device: torch.device, eager: bool
    ) -> tuple[Tensor | Sequence[Any], Tensor | None]:
        if not eager:
            return patches, mask
        if isinstance(patches, Tensor):
            return patches.to(device), mask
        return [p.to(device) if isinstance(p, Tensor) else p for p in patches], mask


def _grid_positions(
    ids: Tensor, grid_shape: tuple[int, int] | None, patches: Tensor | Sequence[Any]
) -> Tensor | None:
    """(B, K, 2) (row, col) of raster ids, from grid_shape or from the containers."""
    if grid_shape is not None:
        cols = grid_shape[1]
        return torch.stack([ids // cols, ids % cols], dim=-1)
    if not isinstance(patches, Tensor) and all(hasattr(p, "positions") for p in patches):
        rows = [
            torch.as_tensor(p.positions(i.clamp_max(len(p) - 1).cpu().numpy()))
            for p, i in zip(patches, ids, strict=True)
        ]
        return torch.stack(rows).to(ids.device)
    return None


def _stack_selections(parts: Sequence[Selection]) -> Selection:
    """Stack per-image selections, padding to the largest K with mask False."""
    k = max(p.ids.shape[1] for p in parts)

    def pad(t: Tensor, value: float) -> Tensor:
        return torch.nn.functional.pad(t, (0, k - t.shape[1]), value=value)

    return Selection(
        torch.cat([pad(p.ids, 0) for p in parts]),
        torch.cat([pad(p.scores, 0.0) for p in parts]),
        torch.cat([pad(p.mask, False) for p in parts]),
    )


# ---- building, saving, loading ------------------------------------------------------------


def create_model(config: Config | None = None, **overrides: Any) -> IPSModel:
    """Build an IPSModel from a Config and/or word-named overrides.

    ``create_model(memory_size=100, chunk_size=100, embed_dim=128, num_heads=8,
    in_channels=1, patch_size=50, encoder="resnet18_2blocks",
    tasks={"majority": {"kind": "multiclass", "num_classes": 10}})``
    """
    config = replace_fields(config or Config(), **overrides)
    return IPSModel(config.model, config.selection)


def save_checkpoint(
    path: str | os.PathLike, model: nn.Module, config: Config, **state: Any
) -> Path:
    """Write a checkpoint atomically (temp file in the same folder, then rename).

    The checkpoint holds only plain data and tensors: the config as nested dicts, the model's
    state dict, and ``state`` (optimizer state, epoch, ...), so it loads with
    ``torch.load(weights_only=True)``.

    Raises:
        WriteError: a full disk, a file-size limit or no permission (torch.save's own
            RuntimeError included); one line naming ``path``, whose previous file is kept.
    """
    path = Path(path)
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": config_to_dict(config),
        "model": model.state_dict(),
        **state,
    }
    with atomic_write(path) as f:
        torch.save(payload, f)
    return path


def load_weights(model: nn.Module, weights: Any, failure: str) -> None:
    """Load the state dict ``weights`` into ``model`` once it fits; otherwise raise
    `InputError` with ``failure: <the first difference>``."""
    problem = weights_mismatch(model.state_dict(), weights)
    if problem is not None:
        raise InputError(f"{failure}: {problem}")
    model.load_state_dict(weights)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint as data (``weights_only=True``: it never runs code from the file).

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line naming the file: not a checkpoint, truncated, or a pickle that
            holds Python objects other than tensors and plain data (refused, never run).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # the safe unpickler met something not plain data
        found = re.search(
            r"WeightsUnpickler error:\s*([^\n]*?)(?: was not an allowed|\n|$)", str(err)
        )
        detail = (
            found.group(1).strip() if found and found.group(1).strip() else _first_sentence(err)
        )
        raise InputError(
            f"{path}: refused to load: the file is a pickle the safe loader does not accept "
            f"({detail}); loading it unsafely could run code from it"
        ) from None
    except Exception as err:
        reason = "the file is empty" if path.stat().st_size == 0 else _first_sentence(err)
        raise InputError(
            f"{path}: not a readable checkpoint ({reason}); expected a file written by "
            "ips train or ips.save_checkpoint"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not an ips checkpoint (no '{CHECKPOINT_FORMAT}' format tag)")
    missing = [key for key in ("config", "model") if key not in payload]
    if missing:
        raise InputError(f"{path}: the checkpoint lacks {' and '.join(missing)}")
    return payload


def _first_sentence(err: BaseException) -> str:
    """``KeyError: '101'``: the error's type and the first sentence of its message."""
    text = " ".join(str(err).split())
    text = re.split(r"(?<=\.) ", text, maxsplit=1)[0]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def load_model(path: str | os.PathLike, *, map_location: Any = "cpu", **overrides: Any) -> IPSModel:
    """Rebuild a model from a checkpoint, which carries its config.

    ``overrides`` change selection settings for inference (e.g. ``memory_size``,
    ``chunk_size``, ``loading``); model fields that would change the weights' shapes fail.
    """
    return load_model_and_config(path, map_location=map_location, **overrides)[0]


def load_model_and_config(
    path: str | os.PathLike, *, map_location: Any = "cpu", **overrides: Any
) -> tuple[IPSModel, Config]:
    """`load_model`, and the whole config the checkpoint carries (data and train included;
    model and selection as the returned model has them)."""
    payload = load_checkpoint(path, map_location)
    try:
        config = config_from_dict(payload["config"])
    except ValueError as err:
        raise InputError(f"{path}: incompatible checkpoint config ({err})") from None
    config = replace_fields(config, **overrides)
    model = IPSModel(dataclasses.replace(config.model, pretrained=False), config.selection)
    load_weights(
        model,
        payload["model"],
        f"{path}: the weights do not fit the checkpoint's config "
        f"(encoder {config.model.encoder!r})",
    )
    if isinstance(map_location, (str, torch.device)):
        model = model.to(map_location)
    return model, config
