"""The training recipe: AdamW, linear warm-up then cosine decay, checkpoints, logs.

``fit(config, run_dir)`` trains and evaluates every epoch, writes ``last.pt`` and ``best.pt``
(atomically), ``metrics.csv``, TensorBoard events and the resolved ``config.yaml`` into
``run_dir``, and resumes exactly where it stopped with ``resume=True`` (at an epoch boundary:
data order, selection order and dropout are seeded per epoch).

Under torchrun every process calls ``fit`` (see ``ips.distributed``): ``train.batch_size`` is
the global batch B of one optimizer step, split over the processes and ``train.accumulate``
micro-steps; only rank 0 writes into ``run_dir``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from ips import distributed
from ips import progress as bars
from ips.config import (
    Config,
    TrainConfig,
    config_from_dict,
    reference_departures,
    save_config,
)
from ips.data.augment import build_augment
from ips.data.collate import SkipErrors, collate_patches
from ips.data.registry import build_dataset, build_validation, resolve_config
from ips.distributed import EvalBatchSampler, TrainBatchSampler, balanced_weights
from ips.encoders import with_weights_normalization
from ips.errors import (
    PREEMPTED_EXIT,
    ConfigError,
    InputError,
    InUseError,
    MissingFileError,
    Stopped,
    TrainingError,
    WriteError,
    one_line,
)
from ips.files import atomic_write
from ips.guard import RunLock, StopSignals, WorkerSlots, describe_dead_worker
from ips.heads import compute_loss
from ips.metrics import MAIN_METRIC, MetricTracker, main_metric, selection_diagnostics
from ips.model import IPSModel, load_checkpoint, load_weights, save_checkpoint
from ips.precision import autocast, precision_name, resolve_amp
from ips.rss import max_rss_mb
from ips.selection import eval_mode
from ips.sources.base import CannotReadError

log = logging.getLogger(__name__)

READ_ERRORS = (CannotReadError, OSError)  # patches of a lazy source that cannot be read


# ---- optimisation ---------------------------------------------------------------------------


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Split parameters into decayed and not decayed.

    ``cfg.no_decay`` entries: "norm" matches parameters of normalisation layers, "bias" any
    bias, other strings any parameter whose name contains them (e.g. "queries").
    """
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    norm_params = {
        id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(False)
    }
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = any(
            (rule == "norm" and id(param) in norm_params)
            or (rule == "bias" and name.endswith("bias"))
            or (rule not in ("norm", "bias") and rule in name)
            for rule in cfg.no_decay
        )
        (no_decay if skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up from 1/warmup_steps to 1, then cosine decay to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the parameter groups and a per-step warm-up + cosine schedule."""
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr)
    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=warmup, total_steps=total, min_ratio=cfg.min_lr_ratio)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---- loops ----------------------------------------------------------------------------------


def _forward(
    model: nn.Module,
    batch: Mapping[str, Any],
    device,
    generator,
    amp: str,
    augment: Callable[[Tensor], Tensor] | None = None,
    grid_shape: tuple[int, int] | None = None,
):
    """Selection, then the gradient pass, of ``model`` (an IPSModel, possibly inside
    DistributedDataParallel) on one batch; returns the output, mean loss and targets."""
    core = distributed.unwrap(model)
    targets = {k: v.to(device) for k, v in batch["targets"].items()}
    with autocast(device, amp):
        out = model(
            batch["patches"],
            batch["mask"],
            grid_shape=grid_shape,
            generator=generator,
            augment=augment,
        )
    loss, _ = compute_loss(out.logits, targets, core.tasks)
    return out, loss, targets


@dataclass
class EpochProgress:
    """How far an epoch got, taken between two of its steps: enough to go on from there
    exactly (``train_one_epoch(start=...)``). Plain data, stored in ``last.pt``."""

    step: int = 0  # steps of the epoch done: its first `step` global batches
    seen: int = 0  # images trained on, all processes together
    skipped: int = 0  # images skipped, all processes together
    seconds: float = 0.0  # training time of the epoch so far
    tracker: dict[str, Any] | None = None  # MetricTracker.state() of those steps


class EpochStopped(Exception):
    """``train_one_epoch`` stopped between two steps: ``should_stop`` gave a reason (a
    signal), or a data loader worker died. ``progress`` is where the epoch stands."""

    def __init__(self, reason: str, progress: EpochProgress, *, by_signal: bool) -> None:
        super().__init__(reason)
        self.progress = progress
        self.by_signal = by_signal


def step_generator(seed: int, epoch: int, step: int, rank: int = 0) -> torch.Generator:
    """Seed the global RNG (dropout, augmentation) of one step on one process, and return
    the generator of the step's selection order (the same on every process). Both follow
    from (seed, epoch, step) alone, so an epoch resumed at any step draws what it would have
    drawn uninterrupted, under any number of processes."""
    torch.manual_seed(_mix(seed, epoch, step, rank, 1))
    return torch.Generator().manual_seed(_mix(seed, epoch, step, 0))


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (the same in every process and Python version)."""
    digest = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    cfg: TrainConfig,
    *,
    device: torch.device,
    epoch: int = 0,
    start: EpochProgress | None = None,
    should_stop: Callable[[], str | None] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    augment: Callable[[Tensor], Tensor] | None = None,
    grid_shape: tuple[int, int] | None = None,
    skip_errors: bool = False,
) -> dict[str, float]:
    """One pass over ``loader``; returns the epoch's training metrics (over all processes).

    Step k of epoch e draws its selection order, dropout and augmentation from
    (``cfg.seed``, e, k) (`step_generator`). ``start`` (with a loader from
    ``make_train_loader(start_step=start.step)``) goes on with an epoch that stopped after
    ``start.step`` steps. Before each step ``should_stop()`` is asked (on every process, so
    under DDP it must agree across them): a reason stops the epoch with `EpochStopped`, as
    does a data loader worker that died (its message names the sample the worker held).

    ``augment`` changes the kept patches of the gradient pass (see `IPSModel.forward`);
    ``grid_shape`` (rows, cols) gives 2-D positional encodings over tensor batches. With
    ``skip_errors`` (``data.on_error: skip``) a step whose patches cannot be read during
    selection (a corrupt tile of a lazily read slide) is left out and its images counted as
    skipped (one process only; several processes stop).

    ``model`` is an IPSModel, or one inside DistributedDataParallel (``distributed.wrap``).
    Its forward selects first (no gradients, eval mode, on this process's images only), then
    runs the gradient pass; DDP averages the gradients over the processes during backward.

    With a loader from ``make_train_loader``, one optimizer step takes ``train.accumulate``
    micro-batches (gradients summed, DDP synchronising only the last). The mean loss of each
    micro-batch is weighted by its share of the images of the whole step, so the step follows
    the gradient of the mean loss over the batch, whatever the number of processes and
    micro-steps. Any other loader's batches are one step each.
    """
    core = distributed.unwrap(model)
    ranks = distributed.current()
    parallel = isinstance(model, DistributedDataParallel)
    sampler = loader.batch_sampler
    planned = isinstance(sampler, TrainBatchSampler)
    world_size = sampler.world_size if planned else 1
    if parallel != (world_size > 1):
        raise InputError(
            "a model in DistributedDataParallel needs a loader from make_train_loader with the "
            "process group's world_size, and such a loader needs the wrapped model"
        )
    begin = start or EpochProgress()
    first = sampler.start_step if planned else 0
    if begin.step != first:
        raise InputError(
            f"start is at step {begin.step} of the epoch, the loader at step {first}: make it "
            f"with make_train_loader(..., start_step={begin.step})"
        )
    epoch_state = _EpochState(
        tracker=MetricTracker(core.tasks)
        if begin.tracker is None or not ranks.is_main  # rank 0 carries the stored updates
        else MetricTracker.from_state(core.tasks, begin.tracker),
        seen=begin.seen,
        skipped=begin.skipped if ranks.is_main else 0,
        started=time.perf_counter() - begin.seconds,
        step=begin.step,
    )
    shares = iter(sampler.shares) if planned else None
    accumulate = sampler.accumulate if planned else 1
    model.train()
    batches = progress(loader) if progress else loader
    chunks = _chunks(batches, accumulate)
    while True:
        reason = should_stop() if should_stop is not None else None
        if reason:
            raise EpochStopped(reason, epoch_state.progress(parallel), by_signal=True)
        try:
            parts = next(chunks)
        except StopIteration:
            break
        except RuntimeError as err:  # a worker process that died (the OOM killer, say)
            dataset = loader.dataset
            slots, describe = getattr(dataset, "slots", None), getattr(dataset, "describe", None)
            message = describe_dead_worker(err, slots, describe)
            if message is None:
                raise
            if parallel:  # the other processes wait in a collective: no checkpoint to agree on
                raise TrainingError(message) from None
            raise EpochStopped(message, epoch_state.progress(False), by_signal=False) from None
        counts = []  # images of each micro-batch that count (none for a stand-in)
        for batch in parts:
            epoch_state.skipped += _report_skipped(batch)
            share = next(shares)[0] if shares is not None else len(batch["index"])
            counts.append(min(share, len(batch["index"])))
        generator = step_generator(cfg.seed, epoch, epoch_state.step, ranks.rank)
        epoch_state.step += 1
        stats = _train_step(
            model,
            parts,
            counts,
            epoch_state,
            optimizer,
            scheduler,
            cfg,
            device=device,
            generator=generator,
            scaler=scaler,
            augment=augment,
            grid_shape=grid_shape,
            skip_errors=skip_errors and not parallel,
            dataset=loader.dataset,
        )
        if stats is None:
            continue
        if hasattr(batches, "set_postfix"):
            batches.set_postfix({k: f"{v:.3g}" for k, v in stats.items()})
        if on_step is not None:
            on_step(scheduler.last_epoch, stats)
    tracker, skipped = epoch_state.tracker, epoch_state.skipped
    if parallel:
        tracker = MetricTracker.merged(distributed.all_gather(tracker))
        skipped = int(distributed.all_sum([skipped])[0])
    metrics = tracker.compute()
    metrics["images_per_second"] = epoch_state.seen / max(epoch_state.seconds(), 1e-9)
    metrics["skipped"] = skipped
    return metrics


@dataclass
class _EpochState:
    """What ``train_one_epoch`` accumulates from step to step."""

    tracker: MetricTracker
    seen: int  # images trained on, all processes
    skipped: int  # images skipped, this process
    started: float  # perf_counter at the (virtual) start of the epoch
    step: int  # steps done
    fallback: Mapping[str, Any] | None = None  # the last micro-batch with images (a stand-in)

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def progress(self, parallel: bool) -> EpochProgress:
        """Where the epoch stands; under DDP a collective (every process must call it)."""
        tracker, skipped = self.tracker, self.skipped
        if parallel:
            tracker = MetricTracker.merged(distributed.all_gather(tracker))
            skipped = int(distributed.all_sum([skipped])[0])
        return EpochProgress(
            step=self.step,
            seen=self.seen,
            skipped=skipped,
            seconds=self.seconds(),
            tracker=tracker.state(),
        )


def _train_step(
    model: nn.Module,
    parts: Sequence[Mapping[str, Any]],
    counts: Sequence[int],
    state: _EpochState,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    cfg: TrainConfig,
    *,
    device: torch.device,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler | None,
    augment: Callable[[Tensor], Tensor] | None,
    grid_shape: tuple[int, int] | None,
    skip_errors: bool,
    dataset: Dataset,
) -> dict[str, float] | None:
    """One optimizer step over the micro-batches ``parts`` (``counts``: the images of each
    that count); its loss, learning rate and images/s, or None when it was left out."""
    core = distributed.unwrap(model)
    parallel = isinstance(model, DistributedDataParallel)
    world_size = distributed.current().world_size if parallel else 1
    total = int(distributed.all_sum([sum(counts)])[0]) if parallel else sum(counts)
    if total == 0:  # every image of this batch failed to read, on every process
        return None
    optimizer.zero_grad(set_to_none=True)
    order = generator.get_state()
    step_loss = 0.0
    done = []  # (logits, targets, loss, diagnostics) per micro-batch, tracked once it stepped
    for i, (batch, count) in enumerate(zip(parts, counts, strict=True)):
        if not count:
            if not parallel:  # nothing to do and no other process to keep in step with
                continue
            batch = batch if len(batch["index"]) else state.fallback  # weighted 0 below
            if batch is None:
                raise RuntimeError(
                    f"rank {distributed.current().rank}: no image of its first micro-batch "
                    "could be read, so it has nothing to keep in step with the other "
                    "processes (see the skipped items above)"
                )
        generator.set_state(order)  # each micro-batch visits patches in the batch's order
        synced = i == len(parts) - 1 or not parallel
        with contextlib.nullcontext() if synced else model.no_sync():
            try:
                out, loss, targets = _forward(
                    model, batch, device, generator, cfg.amp, augment, grid_shape
                )
            except READ_ERRORS as err:  # a tile of a lazy slide that cannot be decoded
                if not skip_errors or isinstance(err, WriteError):  # (no skipping under DDP)
                    raise
                # the whole step is left out, its images counted skipped
                log.warning("skipped a step of %d images: %s", total, one_line(err))
                state.skipped += total
                optimizer.zero_grad(set_to_none=True)
                return None
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"the training loss became {loss.item()} at step {scheduler.last_epoch}; "
                    "the last good checkpoint is kept (lower train.lr or set train.grad_clip)"
                )
            weighted = loss * (count * world_size / total)  # DDP divides by world_size
            (scaler.scale(weighted) if scaler is not None else weighted).backward()
        if not count:
            continue
        state.fallback = batch
        diagnostics = selection_diagnostics(
            dataset, batch["index"], out.selected, out.mask, out.attention
        )
        done.append((out.logits, targets, loss.item(), diagnostics))
        step_loss += loss.item() * count
    for logits, targets, loss_value, diagnostics in done:
        state.tracker.update(logits, targets, loss_value)
        for name, values in diagnostics.items():
            state.tracker.add(name, values)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if cfg.grad_clip is not None:
        nn.utils.clip_grad_norm_(core.parameters(), cfg.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    if parallel:
        step_loss = distributed.all_sum([step_loss])[0]
    state.seen += total
    rate = state.seen / max(state.seconds(), 1e-9)
    return {"loss": step_loss / total, "lr": optimizer.param_groups[0]["lr"], "img/s": rate}


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive groups of ``size`` items (the last may be shorter)."""
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _report_skipped(batch: Mapping[str, Any]) -> int:
    for item in batch.get("skipped", ()):
        log.warning("skipped %s", item["error"])
    return len(batch.get("skipped", ()))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device,
    amp: str = "none",
    seed: int = 0,
    progress: Callable[[Iterable], Iterable] | None = None,
    grid_shape: tuple[int, int] | None = None,
    skip_errors: bool = False,
) -> dict[str, float]:
    """Metrics per task (accuracy, exact match and label accuracy, AUC), the loss, and the
    selection diagnostics, with the model in eval mode. ``grid_shape``: (rows, cols) for 2-D
    positional encodings over tensor batches. With ``skip_errors`` a batch whose patches
    cannot be read is left out and counted as skipped (one process only).

    The selection order of batch k is seeded by (``seed``, k), so a batch gives the same
    result whichever process evaluates it: with a loader from ``make_eval_loader`` each
    process evaluates its share of the batches and the results are gathered in batch order,
    which gives the metrics of one process evaluating them all.
    """
    core = distributed.unwrap(model)  # no DDP forward: processes evaluate different numbers
    sampler = loader.batch_sampler
    sharded = isinstance(sampler, EvalBatchSampler) and sampler.world_size > 1
    batch_ids = sampler.batch_ids if isinstance(sampler, EvalBatchSampler) else range(len(loader))
    records = []  # (batch number, logits, targets, loss, diagnostics)
    skipped = 0
    with eval_mode(core):
        for k, batch in zip(batch_ids, progress(loader) if progress else loader, strict=True):
            skipped += _report_skipped(batch)
            if not len(batch["index"]):
                continue
            generator = torch.Generator().manual_seed(seed * 1_000_033 + k)
            try:
                out, loss, targets = _forward(
                    core, batch, device, generator, amp, grid_shape=grid_shape
                )
            except READ_ERRORS as err:
                if not skip_errors or sharded or isinstance(err, WriteError):
                    raise
                log.warning("skipped %d images: %s", len(batch["index"]), one_line(err))
                skipped += len(batch["index"])
                continue
            diagnostics = selection_diagnostics(
                loader.dataset, batch["index"], out.selected, out.mask, out.attention
            )
            logits = {name: value.float().cpu() for name, value in out.logits.items()}
            targets = {name: value.cpu() for name, value in targets.items()}
            records.append((k, logits, targets, loss.item(), diagnostics))
    if sharded:
        gathered = [record for part in distributed.all_gather(records) for record in part]
        records = sorted(gathered, key=lambda record: record[0])  # batch order
        skipped = int(distributed.all_sum([skipped])[0])
    tracker = MetricTracker(core.tasks)
    for _, logits, targets, loss, diagnostics in records:
        tracker.update(logits, targets, loss)
        for name, values in diagnostics.items():
            tracker.add(name, values)
    return {**tracker.compute(), "skipped": skipped}


# ---- logging --------------------------------------------------------------------------------


class RunLogger:
    """metrics.csv (one row per epoch, columns grow as needed) and TensorBoard events."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = run_dir / "metrics.csv"
        self.enabled = enabled
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.warning("TensorBoard logs are off: pip install tensorboard")

    def step(self, step: int, stats: Mapping[str, float]) -> None:
        if self.writer is not None:
            for key, value in stats.items():
                self.writer.add_scalar(f"step/{key.replace('/', '_')}", value, step)

    def epoch(self, row: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        rows = []
        if self.path.exists():
            with self.path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        rows = [r for r in rows if int(r["epoch"]) < int(row["epoch"])]  # resumed: drop reruns
        rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with atomic_write(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, int(row["epoch"]))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ---- fit ------------------------------------------------------------------------------------


def make_loader(
    dataset: Dataset, config: Config, *, shuffle: bool, epoch: int = 0, batch_size=None
) -> DataLoader:
    """A loader whose shuffling is seeded by (seed, epoch), so a resumed epoch sees the same
    order."""
    generator = torch.Generator().manual_seed(_shuffle_seed(config.train.seed, epoch))
    return _loader(
        dataset,
        config,
        batch_size=batch_size or config.train.batch_size,
        shuffle=shuffle,
        generator=generator if shuffle else None,
    )


def make_train_loader(
    dataset: Dataset,
    config: Config,
    *,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
) -> DataLoader:
    """This process's training micro-batches for one epoch: the batches of
    ``make_loader(shuffle=True)`` (seeded by (seed, epoch)), each split over ``world_size``
    processes and ``train.accumulate`` micro-steps (see ``TrainBatchSampler``), from global
    batch ``start_step`` on. A dataset's own random draws (augmentation while reading) are
    seeded by (seed, epoch, image), whichever process or worker reads the image."""
    seed = _shuffle_seed(config.train.seed, epoch)
    sampler = TrainBatchSampler(
        len(dataset),
        config.train.batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        accumulate=config.train.accumulate,
        weights=_balance_weights(dataset, config.data.balance),
        start_step=start_step,
    )
    workers = config.data.num_workers
    items = _TrainItems(dataset, seed, WorkerSlots(workers) if workers else None)
    # the loader's own generator only seeds its worker processes: one per rank
    generator = torch.Generator().manual_seed(seed + rank * 1_000_000_007)
    return _loader(items, config, batch_sampler=sampler, generator=generator)


class _TrainItems(Dataset):
    """The training set as one epoch reads it: image i's random draws seeded by (the epoch's
    seed, i), and, with worker processes, the image each worker is reading kept in ``slots``
    (named when a worker dies)."""

    def __init__(self, dataset: Dataset, seed: int, slots: WorkerSlots | None) -> None:
        self.dataset, self.seed, self.slots = dataset, seed, slots

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # grid_shape, foreground_patches, describe, ...
        if name in ("dataset", "seed", "slots"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, i: int) -> Any:
        reading = self.slots.reading(i) if self.slots is not None else contextlib.nullcontext()
        with reading, torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(self.seed, i))
            return self.dataset[i]


def _balance_weights(dataset: Dataset, task: str | None) -> list[float] | None:
    """Inverse class frequencies of ``task`` (``data.balance``) per image, or None. The labels
    come from the dataset's ``targets(i)``, which reads no image."""
    if task is None:
        return None
    targets = getattr(dataset, "targets", None)
    if not callable(targets):
        raise InputError(
            f"data.balance: the {type(dataset).__name__} dataset does not give its labels "
            "without reading every image; leave data.balance out"
        )
    classes = []
    for i in range(len(dataset)):
        value = float(targets(i)[task])  # -1 (multiclass) or NaN (binary) where unknown
        classes.append(-1 if math.isnan(value) or value < 0 else int(value))
    return balanced_weights(classes)


def make_eval_loader(
    dataset: Dataset, config: Config, *, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """This process's share of the evaluation batches (``train.batch_size`` consecutive images
    each, dealt to the processes in turn; see ``EvalBatchSampler``)."""
    sampler = EvalBatchSampler(
        len(dataset), config.train.batch_size, rank=rank, world_size=world_size
    )
    return _loader(dataset, config, batch_sampler=sampler)


def _loader(dataset: Dataset, config: Config, **options: Any) -> DataLoader:
    if config.data.on_error == "skip":
        dataset = SkipErrors(dataset)
    return DataLoader(
        dataset,
        num_workers=config.data.num_workers,
        collate_fn=collate_patches,
        persistent_workers=False,
        **options,
    )


def _shuffle_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


@dataclass
class Run:
    """What a training run holds between its steps."""

    config: Config
    model: IPSModel  # the model itself (checkpoints hold it unwrapped)
    trained: nn.Module  # what trains: the model, or it inside DistributedDataParallel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None  # fp16 only
    train_set: Dataset
    val_set: Dataset | None
    augment: Callable[[Tensor], Tensor] | None  # kept patches of the gradient pass
    grid_shape: tuple[int, int] | None  # (rows, cols) of a dataset with one fixed grid
    start_epoch: int = 0
    best: float = -math.inf  # best validation score so far
    progress: EpochProgress | None = None  # how far the epoch start_epoch got, if it began
    elapsed: float = 0.0  # training seconds before this call of fit (earlier calls)


RESUME_MODES = (False, True, "auto")


def fit(
    config: Config,
    run_dir: str | os.PathLike,
    *,
    resume: bool | str = False,
    device: torch.device | str = "cpu",
    progress: bool = True,
    max_epochs: int | None = None,
) -> dict[str, Any]:
    """Train ``config`` into ``run_dir``; return a summary with the best and last metrics.

    In a process group (``distributed.init_distributed``, e.g. under torchrun) every process
    calls ``fit``: each trains on its share of every batch through DistributedDataParallel and
    evaluates its share of the validation batches; only rank 0 writes into ``run_dir``. The
    checkpoints hold nothing that depends on the number of processes, so a run resumes under
    any number.

    One run writes into a folder at a time (``run_dir/run.lock``, see `ips.guard.RunLock`).
    SIGTERM or SIGUSR1 (a scheduler about to end the job) stops training after the current
    step: ``last.pt`` then holds that step, and `ips.errors.Stopped` is raised; ``resume``
    goes on from it exactly.

    Args:
        config: the run's configuration (data, model, selection, train).
        run_dir: output folder (created); every process reads ``last.pt`` from it to resume.
        resume: True: continue from ``run_dir/last.pt`` (its stored config wins over
            ``config`` except for ``train.epochs``); "auto": continue where there is a
            ``last.pt``, start otherwise; False: start, refused where ``last.pt`` exists.
        device: where the model runs (this process's device).
        progress: show tqdm progress bars (rank 0 only).
        max_epochs: stop after this many epochs in this call (for time-boxed runs); the
            schedule still follows ``train.epochs``.
    """
    if resume not in RESUME_MODES:
        raise ConfigError(f"resume must be True, False or 'auto', got {resume!r}")
    run_dir, device = Path(run_dir), torch.device(device)
    ranks = distributed.current()
    with contextlib.ExitStack() as held:
        if ranks.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            held.enter_context(RunLock(run_dir))
        last = run_dir / "last.pt"
        if resume == "auto":
            resume = last.is_file()
        elif not resume and ranks.is_main and last.is_file():
            raise InUseError(
                f"{run_dir}: already holds a run ({last.name}); --resume continues it (resume="
                "True), --resume auto continues it or starts where there is none; to start "
                "over, delete the folder or train into another one"
            )
        state = _last_checkpoint(run_dir) if resume else None  # the exact point to go on from
        run = _setup(
            config if state is None else _stored_config(state, config),
            run_dir,
            device,
            fresh=state is None,
        )
        if state is not None:
            _restore(run, state, last)
        return _epochs(run, run_dir, device, progress=progress, max_epochs=max_epochs)


def _last_checkpoint(run_dir: Path) -> dict[str, Any]:
    last = run_dir / "last.pt"
    if not last.is_file():
        raise MissingFileError(
            f"{last}: nothing to resume (no last checkpoint); --resume auto starts a run where "
            "there is none"
        )
    return load_checkpoint(last)


def _stored_config(state: Mapping[str, Any], given: Config) -> Config:
    """A resumed run's config: the stored one, with the given training settings when only
    ``train.epochs`` differs (a run extended)."""
    stored = config_from_dict(state["config"])
    train = given.train if given.train.epochs != stored.train.epochs else stored.train
    return dataclasses.replace(stored, train=train)


def _setup(config: Config, run_dir: Path, device: torch.device, *, fresh: bool = True) -> Run:
    """Check the recipe, open the data, build the model (a ``fresh`` run: with the weights of
    ``train.init_from`` where set), optimizer and schedule; write the resolved config once the
    data opened and the weights fit (a failed start leaves the folder as it was)."""
    ranks, cfg = distributed.current(), config.train
    distributed.micro_batch_size(cfg.batch_size, ranks.world_size, cfg.accumulate)
    if cfg.sync_batchnorm and ranks.world_size > 1 and device.type != "cuda":
        raise InputError(
            "train.sync_batchnorm needs CUDA devices (torch's SyncBatchNorm does not run on "
            "the CPU); leave it false for CPU processes"
        )
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    # what the data and the weights decide (a stored config has it already)
    config = resolve_config(config)
    config = dataclasses.replace(config, model=with_weights_normalization(config.model))
    train_set, val_set = build_dataset(config, "train"), build_validation(config)
    if ranks.is_main:
        log.info(
            "data: %d training images, %s",
            len(train_set),
            "no validation" if val_set is None else f"{len(val_set)} validation images",
        )
        log.info(
            "precision: %s%s",
            precision_name(resolve_amp(device, cfg.amp)),
            f" (train.amp: auto on {device.type})" if cfg.amp == "auto" else "",
        )
        departures = reference_departures(config)
        log.info(
            "settings unlike the reference code: %s",
            ", ".join(departures) if departures else "none",
        )
    augment = None
    if config.model.encoder != "features" and config.data.augment.active:
        augment = build_augment(config.data.augment, channels=config.model.in_channels)
    torch.manual_seed(cfg.seed)
    model = IPSModel(config.model, config.selection).to(device)
    if fresh and cfg.init_from is not None:
        _initialise(model, Path(cfg.init_from))
    if ranks.is_main:
        save_config(config, run_dir / "config.yaml")
    model.set_grad_checkpointing(cfg.activation_checkpointing)
    if cfg.sync_batchnorm and ranks.world_size > 1:  # same parameters and buffers, synced
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)  # optimizer steps
    optimizer, scheduler = build_optimizer(model, cfg, steps_per_epoch)
    return Run(
        config=config,
        model=model,
        trained=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None,
        train_set=train_set,
        val_set=val_set,
        augment=augment,
        grid_shape=getattr(train_set, "grid_shape", None),
    )


def _initialise(model: IPSModel, path: Path) -> None:
    """Start from the model weights of another run's checkpoint (``train.init_from``); the
    optimizer, schedule and epoch start afresh. A resumed run has its own weights already."""
    try:
        state = load_checkpoint(path)
    except (MissingFileError, InputError) as err:  # one line naming the file
        raise type(err)(f"train.init_from: {err}") from None
    if not isinstance(state, Mapping) or "model" not in state:
        raise InputError(f"train.init_from: {path}: not an ips checkpoint (no model weights)")
    load_weights(
        model,
        state["model"],
        f"train.init_from: {path}: its weights do not fit this config's model",
    )
    if distributed.current().is_main:
        log.info(
            "weights from %s (epoch %s, %.0f s of training)",
            path,
            state.get("epoch", "?"),
            float(state.get("elapsed", 0.0)),
        )


def _restore(run: Run, state: Mapping[str, Any], last: Path) -> None:
    """Weights, optimizer, schedule, epoch, best score and, for a checkpoint taken inside an
    epoch, how far that epoch got, from ``last.pt``."""
    load_weights(
        run.model, state["model"], f"{last}: cannot resume, its weights do not fit its own config"
    )
    try:
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        if run.scaler is not None and "scaler" in state:
            run.scaler.load_state_dict(state["scaler"])
        progress = state.get("progress")
        run.progress = EpochProgress(**progress) if progress is not None else None
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise InputError(
            f"{last}: cannot resume, its optimizer state does not fit the model ({reason})"
        ) from None
    run.start_epoch, run.best = int(state["epoch"]), float(state["best"])
    run.elapsed = float(state.get("elapsed", 0.0))
    if distributed.current().is_main:
        where = f", step {run.progress.step}" if run.progress is not None else ""
        log.info("resumed %s at epoch %d%s", last.parent, run.start_epoch, where)


def _epochs(
    run: Run, run_dir: Path, device: torch.device, *, progress: bool, max_epochs: int | None
) -> dict[str, Any]:
    """Train, validate and save each epoch. A stop signal saves the step reached as last.pt
    and raises `Stopped`; Ctrl-C keeps the weights reached beside last.pt."""
    ranks, cfg = distributed.current(), run.config.train
    # DDP copies rank 0's parameters and buffers to every process here
    run.trained = distributed.wrap(run.model) if ranks.world_size > 1 else run.model
    logger = RunLogger(run_dir, enabled=ranks.is_main)
    bar = _progress_factory(progress and ranks.is_main)
    history: list[dict[str, Any]] = []
    started = time.perf_counter()

    def elapsed() -> float:  # training seconds of the run, earlier calls of fit included
        return run.elapsed + time.perf_counter() - started

    stop = cfg.epochs if max_epochs is None else min(cfg.epochs, run.start_epoch + max_epochs)
    epoch = run.start_epoch
    signals = StopSignals()
    try:
        with signals:
            should_stop = functools.partial(_agreed_stop, signals)
            for epoch in range(run.start_epoch, stop):
                start, run.progress = run.progress, None
                try:
                    row = _train_epoch(
                        run,
                        epoch,
                        device,
                        bar(f"epoch {epoch + 1}/{cfg.epochs}"),
                        logger,
                        start=start,
                        should_stop=should_stop,
                    )
                except EpochStopped as stopped:
                    if ranks.is_main:
                        _save(run, run_dir, epoch, elapsed=elapsed(), progress=stopped.progress)
                    distributed.barrier()
                    raise _stopped(stopped, run_dir, epoch) from None
                validated = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == stop
                is_best = run.val_set is None
                if run.val_set is not None and validated:
                    row.update(_validate(run, device))
                    is_best = row[MAIN_METRIC] > run.best
                    run.best = max(run.best, row[MAIN_METRIC])
                row["elapsed_s"] = elapsed()
                row["peak_rss_mb"] = round(max_rss_mb(children=True), 1)  # workers included
                if ranks.is_main:
                    _save(run, run_dir, epoch + 1, elapsed=row["elapsed_s"], row=row, best=is_best)
                logger.epoch(row)
                history.append(row)
                reason = should_stop() if epoch + 1 < stop else None
                if reason:  # a signal during validation or the save: last.pt is the epoch's
                    distributed.barrier()
                    raise Stopped(
                        f"stopped by {reason} after epoch {epoch + 1}; {run_dir / 'last.pt'} "
                        "holds it: the same command with --resume continues from there",
                        exit_status=PREEMPTED_EXIT,
                    )
    except KeyboardInterrupt:
        if not ranks.is_main:
            raise
        # last.pt stays at the last finished epoch (an exact resume point); keep the weights
        # reached inside the interrupted epoch beside it
        save_checkpoint(
            run_dir / "interrupted.pt",
            run.model,
            run.config,
            epoch=epoch,
            best=run.best,
            step=run.scheduler.last_epoch,
        )
        log.warning(
            "interrupted in epoch %d: weights saved to %s; --resume continues from the end "
            "of epoch %d (last.pt)",
            epoch + 1,
            run_dir / "interrupted.pt",
            epoch,
        )
        raise
    finally:
        logger.close()
    distributed.barrier()  # when fit returns on any process, rank 0 has written everything
    return {"run_dir": str(run_dir), "epochs": stop, "best": run.best, "history": history}


def _agreed_stop(signals: StopSignals) -> str | None:
    """The signal this process got, if any; under DDP a collective, so that every process
    stops at the same step when any one got a signal."""
    reason = signals.received
    if distributed.current().world_size > 1:
        if distributed.all_sum([reason is not None])[0] > 0:
            return reason or "a signal to another process"
        return None
    return reason


def _stopped(stopped: EpochStopped, run_dir: Path, epoch: int) -> Stopped:
    """The error for an epoch stopped between two steps, its checkpoint written."""
    where = (
        f"{run_dir / 'last.pt'} holds epoch {epoch + 1} after step {stopped.progress.step}: "
        "the same command with --resume continues from there"
    )
    if stopped.by_signal:
        return Stopped(f"stopped by {stopped}; {where}", exit_status=PREEMPTED_EXIT)
    return Stopped(f"{stopped}; {where}", exit_status=1)


def _train_epoch(
    run: Run,
    epoch: int,
    device: torch.device,
    progress: Callable[[Iterable], Iterable] | None,
    logger: RunLogger,
    *,
    start: EpochProgress | None = None,
    should_stop: Callable[[], str | None] | None = None,
) -> dict[str, Any]:
    """One epoch of training (from ``start`` on, if it had begun); its row of metrics.csv
    so far."""
    ranks, cfg = distributed.current(), run.config.train
    loader = make_train_loader(
        run.train_set,
        run.config,
        epoch=epoch,
        rank=ranks.rank,
        world_size=ranks.world_size,
        start_step=start.step if start is not None else 0,
    )
    metrics = train_one_epoch(
        run.trained,
        loader,
        run.optimizer,
        run.scheduler,
        cfg,
        device=device,
        epoch=epoch,
        start=start,
        should_stop=should_stop,
        scaler=run.scaler,
        progress=progress,
        on_step=lambda step, stats: logger.step(step, stats) if step % cfg.log_every == 0 else None,
        augment=run.augment,
        grid_shape=run.grid_shape,
        skip_errors=run.config.data.on_error == "skip",
    )
    row: dict[str, Any] = {"epoch": epoch + 1, "step": run.scheduler.last_epoch}
    row["lr"] = run.optimizer.param_groups[0]["lr"]
    row.update({f"train_{k}": v for k, v in metrics.items()})
    return row


def _validate(run: Run, device: torch.device) -> dict[str, Any]:
    """The validation columns of an epoch's row, and the score that picks best.pt."""
    ranks = distributed.current()
    if ranks.world_size > 1:  # BatchNorm statistics of rank 0, as checkpointed
        distributed.broadcast_buffers(run.model)
    loader = make_eval_loader(run.val_set, run.config, rank=ranks.rank, world_size=ranks.world_size)
    val = evaluate(
        run.model,
        loader,
        device=device,
        amp=run.config.train.amp,
        seed=run.config.train.seed,
        grid_shape=run.grid_shape,
        skip_errors=run.config.data.on_error == "skip",
    )
    return {
        **{f"val_{k}": v for k, v in val.items()},
        MAIN_METRIC: main_metric(val, run.model.tasks),
    }


def _save(
    run: Run,
    run_dir: Path,
    epoch: int,
    *,
    elapsed: float,
    row: Mapping[str, Any] | None = None,
    best: bool = False,
    progress: EpochProgress | None = None,
) -> None:
    """last.pt (the resume point: ``epoch`` epochs done, and ``progress`` into the next) and,
    when validation improved, best.pt; atomically."""
    extra: dict[str, Any] = {"epoch": epoch, "best": run.best, "elapsed": elapsed}
    if row is not None:
        extra["metrics"] = json.dumps(row)
    if progress is not None:
        extra["progress"] = dataclasses.asdict(progress)
    save_checkpoint(
        run_dir / "last.pt",
        run.model,
        run.config,
        optimizer=run.optimizer.state_dict(),
        scheduler=run.scheduler.state_dict(),
        **({"scaler": run.scaler.state_dict()} if run.scaler else {}),
        **extra,
    )
    if best:
        save_checkpoint(run_dir / "best.pt", run.model, run.config, **extra)
    if row is not None:
        log.info("epoch %d: %s", epoch, _summary(row))


def _summary(row: Mapping[str, Any]) -> str:
    keys = [k for k in row if k.startswith("val_") and "/" in k] + ["train_loss"]
    return ", ".join(f"{k}={row[k]:.4g}" for k in keys if k in row)


def _progress_factory(enabled: bool) -> Callable[[str], Callable[[Iterable], Iterable] | None]:
    """``factory(desc)``: a function wrapping an iterable in a progress bar, or None."""

    def factory(desc: str) -> Callable[[Iterable], Iterable] | None:
        return (lambda items: bars.iterate(items, desc)) if enabled else None

    return factory


# ---- evaluation of a stored model -----------------------------------------------------------


def evaluation_settings(
    checkpoint: str | os.PathLike, *, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """What an evaluation of ``checkpoint`` on ``device`` runs with, for its record: the
    epochs trained, M, I, distinct memory, the precision and the selection order's seed."""
    state = load_checkpoint(checkpoint)
    config = config_from_dict(state["config"])
    return {
        "epoch": state.get("epoch"),
        "elapsed_s": state.get("elapsed"),
        "memory_size": config.selection.memory_size,
        "chunk_size": config.selection.chunk_size,
        "distinct": config.selection.distinct,
        "precision": resolve_amp(torch.device(device), config.train.amp),
        "selection_order": f"shuffled, seed {config.train.seed}"
        if config.selection.shuffle
        else "raster",
    }


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    data_path: str | None = None,
    split: str = "test",
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, float]:
    """Metrics of a stored model on a split of its dataset (or of ``data_path``), with the
    selection seed used at training time, so validation metrics match the logged ones."""
    from ips.model import load_model

    model = load_model(checkpoint)  # checks the stored config and weights, naming the file
    config = config_from_dict(load_checkpoint(checkpoint)["config"])
    if data_path is not None:
        config = Config(
            model=config.model,
            selection=config.selection,
            data=dataclasses.replace(config.data, path=str(data_path)),
            train=config.train,
        )
    device = torch.device(device)
    model = model.to(device)
    dataset = build_dataset(config, split)
    bar = _progress_factory(progress)(f"eval {split}")
    return evaluate(
        model,
        make_loader(dataset, config, shuffle=False),
        device=device,
        amp=config.train.amp,
        seed=config.train.seed,
        progress=bar,
        grid_shape=getattr(dataset, "grid_shape", None),
        skip_errors=config.data.on_error == "skip",
    )
