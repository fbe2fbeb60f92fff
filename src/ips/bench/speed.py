"""Speed of IPS against its compute floor, measured side by side in one process.

`bench_speed` times, for one configuration (default: the paper's Megapixel MNIST model,
B = 16 images of N = 900 patches, M = I = 100), after warm-up and as the median of several
repetitions:

    floor     the encoder alone: every DISTINCT patch of the B x N encoded once without
              gradients at the encoder's best batch size, plus forward and backward of the
              B x M selected patches. No selection bookkeeping, no pooling, no optimizer.
    step      one IPS training step: selection (no gradients), the gradient pass over the M
              kept patches, pooling, heads, loss, backward, AdamW step.
    infer     selection + forward, as in prediction.
    full      the no-selection baseline: all N patches with gradients (M >= N), when its
              estimated memory fits.

Inputs: "mnist" (Megapixel MNIST images), "dense" (random pixels, no patch repeated), or
"features": B feature bags read lazily from HDF5 files, whose floor also counts reading every
row and the pooling and heads of the gradient pass (see `ips.bench.feature_speed`).

Each of these runs for a list of variants, one speed option changed at a time, so the
speed-up of every option is measured separately on the same inputs in the same process:

    reference       every patch encoded (no dedup), NCHW memory format, fp32, one encoder
                    call per chunk (B x I patches), every patch's attention keys computed:
                    the plain algorithm
    channels_last   reference + channels-last memory format for the convolutional encoder
    dedup           reference + identical patches of a chunk encoded once (exact in eval mode)
    micro_batch     reference + encoder calls of the floor's best batch size
    fold_queries    reference + the queries folded into the key projection (attention logits
                    as (W_k^T q) . x, not q . (W_k x): exact in exact arithmetic)
    default         the config's own settings (shipped: channels-last, dedup except in
                    camelyon16, folded queries, micro-batches of 64 on a CPU, 1024 rows for
                    feature bags, whole chunks elsewhere)
    bf16            default + bfloat16 autocast (where the device supports it)
    fp16            default + float16 autocast and a gradient scaler (CUDA only)
    compile         default + torch.compile of the encoder (only when asked: slow to build)

For the shipped variant (`default`) two more figures say where the time goes: its selection
timed on its own, and step / floor measured as back-to-back pairs (floor run, step run) whose
median ratio is insensitive to slow spells of a shared machine.

Every variant's selection is compared with the reference's (`same_selection`): exact
equality is expected in fp32, reduced precision may swap near-ties.

Peak memory of each measurement: on CUDA, the allocator's peak above what was allocated
before; on the CPU, the process's resident high-water mark above the resident memory before
(reset through `/proc/self/clear_refs`, Linux only; None elsewhere; see `ips.rss`).
`peak_rss_mb` is the resident high-water mark itself, on every device.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import os
import platform
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ips.bench.feature_speed import (
    FeatureSpeedBatch,
    feature_config,
    feature_floors,
    make_feature_batch,
)
from ips.bench.measuring import (
    Floors,
    Meter,
    ReadCounter,
    Timing,
    amp_supported,
    best_batch_size,
    encode_all,
    floor_record,
    paired_seconds,
    random_target,
)
from ips.config import Config, TrainConfig, replace_fields
from ips.errors import InputError
from ips.heads import compute_loss
from ips.model import IPSModel
from ips.precision import autocast, native_bf16
from ips.selection import eval_mode
from ips.train import build_optimizer

logger = logging.getLogger(__name__)

PIXEL_INPUTS = ("mnist", "dense")
INPUTS = (*PIXEL_INPUTS, "features")
CHUNK = "chunk"  # encoder_batch_size of a variant: one call per chunk of B x I patches
BEST = "best"  # encoder_batch_size of a variant: the floor's best batch size
VARIANTS: dict[str, dict[str, Any]] = {
    "reference": {"dedup": False, "channels_last": False, "encoder_batch_size": CHUNK},
    "channels_last": {"dedup": False, "channels_last": True, "encoder_batch_size": CHUNK},
    "dedup": {"dedup": True, "channels_last": False, "encoder_batch_size": CHUNK},
    "micro_batch": {"dedup": False, "channels_last": False, "encoder_batch_size": BEST},
    "fold_queries": {"dedup": False, "channels_last": False, "encoder_batch_size": CHUNK},
    "default": {},  # the config's own settings
    "bf16": {"amp": "bf16"},
    "fp16": {"amp": "fp16"},
    "compile": {"compile": True},
}
for _name in ("reference", "channels_last", "dedup", "micro_batch"):  # keys of every patch
    VARIANTS[_name]["fold_queries"] = False
DEFAULT_VARIANTS = (
    "reference",
    "channels_last",
    "dedup",
    "micro_batch",
    "default",
    "bf16",
    "fp16",
)
# channels-last is a no-op for the features projector (no convolutions)
FEATURE_VARIANTS = (
    "reference",
    "dedup",
    "micro_batch",
    "fold_queries",
    "default",
    "bf16",
    "fp16",
)
BATCH_SIZES = (16, 32, 64, 128, 256, 512, 1024)  # tried for the floor's best encoder batch
SPEED_KEYS = ("measure", "variant", "seconds", "images_per_second", "peak_mb")


class StepInput(Protocol):
    """What the measured step runs on: B images' patches (a tensor or B containers), their
    targets, and the patch grid (None: the containers carry positions)."""

    @property
    def patches(self) -> Tensor | Sequence[Any]: ...

    @property
    def targets(self) -> dict[str, Tensor]: ...

    @property
    def grid_shape(self) -> tuple[int, int] | None: ...


@dataclasses.dataclass(frozen=True)
class SpeedBatch:
    """The B images every measurement runs on.

    patches: (B, N, C, P, P) uint8 on the CPU.
    targets: per task, (B,) or (B, classes), on the CPU.
    grid_shape: (rows, cols) of the patch grid.
    distinct: number of distinct patches among the B x N.
    """

    patches: Tensor
    targets: dict[str, Tensor]
    grid_shape: tuple[int, int]
    distinct: int

    @property
    def batch_size(self) -> int:
        """B."""
        return self.patches.shape[0]

    @property
    def num_patches(self) -> int:
        """N."""
        return self.patches.shape[1]


def make_speed_batch(
    config: Config,
    *,
    input: str = "mnist",
    batch_size: int = 16,
    canvas: int = 1500,
    mnist: str | os.PathLike | None = None,
    seed: int = 0,
) -> SpeedBatch:
    """B images cut into the config's patches.

    Args:
        config: the model config (patch size, channels, tasks).
        input: "mnist": Megapixel MNIST images (5 digits and 50 noise strokes on a black
            canvas, so most patches are identical); "dense": uniform random pixels, no
            patch repeated (the worst case for patch deduplication).
        batch_size: B.
        canvas: image side in pixels; N = (canvas // P) ** 2.
        mnist: MNIST digits for "mnist" (see `ips.data.mnist.load_mnist`).
        seed: seed of the images and targets.
    """
    if input not in PIXEL_INPUTS:
        raise InputError(f"input must be one of {PIXEL_INPUTS}, got {input!r}")
    model = config.model
    p = model.patch_size
    if p is None or model.encoder == "features":
        raise InputError("bench speed needs a pixel encoder with model.patch_size set")
    if canvas < p:
        raise InputError(f"canvas must be at least model.patch_size = {p}, got {canvas}")
    g = torch.Generator().manual_seed(seed)
    if input == "mnist":
        patches, targets, grid = _mnist_batch(batch_size, canvas, p, mnist, seed)
        if model.in_channels != 1:
            patches = patches.expand(-1, -1, model.in_channels, -1, -1).contiguous()
    else:
        rows = cols = canvas // p
        shape = (batch_size, rows * cols, model.in_channels, p, p)
        patches = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        grid = (rows, cols)
        targets = {}
    targets = {task.name: targets.get(task.name) for task in model.tasks}
    for task in model.tasks:
        if targets[task.name] is None:
            targets[task.name] = random_target(task, batch_size, g)
    distinct = len(torch.unique(patches.reshape(-1, patches[0, 0].numel()), dim=0))
    return SpeedBatch(patches, targets, grid, distinct)


def _mnist_batch(
    batch_size: int, canvas: int, patch_size: int, mnist: Any, seed: int
) -> tuple[Tensor, dict[str, Tensor], tuple[int, int]]:
    from ips.data.megapixel_mnist import MegapixelMNIST, generate_megapixel_mnist
    from ips.data.mnist import load_mnist

    digits = load_mnist(mnist)
    with tempfile.TemporaryDirectory(prefix="ips-bench-speed-") as tmp:
        path = generate_megapixel_mnist(
            Path(tmp) / "mm.npz",
            digits,
            num_train=batch_size,
            num_test=1,
            canvas_size=(canvas, canvas),
            seed=seed,
        )
        dataset = MegapixelMNIST(path, "train", patch_size=patch_size)
        items = [dataset[i] for i in range(batch_size)]
    patches = torch.stack([item["patches"] for item in items])  # (B, N, 1, P, P)
    targets = {k: torch.stack([item["targets"][k] for item in items]) for k in items[0]["targets"]}
    return patches, targets, dataset.grid_shape


# ---- the measured operations ---------------------------------------------------------------


def _build_model(
    config: Config,
    variant: dict[str, Any],
    best_batch: int | None,
    device: torch.device,
    batch_size: int = 1,
    loading: str = "eager",
) -> IPSModel:
    """The config's model with the variant's options (options it does not name stay)."""
    options = {k: variant[k] for k in ("dedup", "channels_last") if k in variant}
    batch = variant.get("encoder_batch_size")
    if batch == BEST:
        options["encoder_batch_size"] = best_batch
    elif batch == CHUNK:
        sel = config.selection
        options["encoder_batch_size"] = batch_size * max(sel.memory_size, sel.chunk_size)
    config = replace_fields(config, loading=loading, **options)
    return IPSModel(config.model, config.selection).to(device)


def training_step(
    model: IPSModel,
    optimizer: torch.optim.Optimizer,
    batch: StepInput,
    *,
    amp: str = "none",
    seed: int = 0,
) -> float:
    """One IPS training step on the batch; returns the loss. fp16 scales the loss with a
    gradient scaler, as training does."""
    device = model.device
    targets = {k: v.to(device) for k, v in batch.targets.items()}
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with autocast(device, amp):
        out = model(batch.patches, grid_shape=batch.grid_shape, generator=generator)
    loss, _ = compute_loss(out.logits, targets, model.tasks)
    optimizer.zero_grad(set_to_none=True)
    if amp == "fp16":
        scaler = torch.amp.GradScaler(device.type)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.item()


def _inference(model: IPSModel, batch: StepInput, amp: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode(), eval_mode(model), autocast(model.device, amp):
        model(batch.patches, grid_shape=batch.grid_shape, generator=generator)


def _encoder_input(model: IPSModel, patches: Tensor) -> Tensor:
    """uint8 patches -> what the encoder itself takes (normalised float, memory format)."""
    with torch.no_grad():
        x = patches.to(model.device).float().div_(255.0)
        if model.normalize_mean is not None:
            x = (x - model.normalize_mean) / model.normalize_std
        if model.model_config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
    return x


def _grad_pass(encoder: nn.Module, x: Tensor, amp: str, device: torch.device) -> None:
    encoder.zero_grad(set_to_none=True)
    with autocast(device, amp):
        out = encoder(x)
    out.float().sum().backward()


def _selection(model: IPSModel, batch: StepInput, seed: int) -> None:
    """The selection part of a training step on its own (no gradients, eval mode)."""
    model.select(
        batch.patches, grid_shape=batch.grid_shape, generator=torch.Generator().manual_seed(seed)
    )


def _floor_run(
    encoder: nn.Module, x: Tensor, xk: Tensor, batch_size: int, device: torch.device
) -> Callable[[], None]:
    """One run of the fp32 floor (distinct patches without gradients at ``batch_size``, then
    the gradient pass over the kept ones), as a closure for `paired_seconds`."""

    def run() -> None:
        encoder.eval()
        encode_all(encoder, x, batch_size)
        encoder.train()
        _grad_pass(encoder, xk, "none", device)
        encoder.zero_grad(set_to_none=True)

    return run


def _pixel_floors(
    probe: IPSModel,
    batch: SpeedBatch,
    *,
    precisions: Sequence[str],
    meter: Meter,
    device: torch.device,
    seed: int,
    emit: Callable[[dict[str, Any]], dict[str, Any]],
) -> Floors:
    """The floor of pixel inputs once per precision: the distinct patches without gradients
    at the encoder's best batch size + forward and backward of the B x M kept patches."""
    B, N = batch.patches.shape[:2]
    flat = batch.patches.reshape(B * N, *batch.patches.shape[2:])
    distinct = torch.unique(flat.reshape(B * N, -1), dim=0).view(-1, *flat.shape[1:])
    selected = probe.select(
        batch.patches, grid_shape=batch.grid_shape, generator=torch.Generator().manual_seed(seed)
    )
    kept = batch.patches[torch.arange(B)[:, None], selected.ids].reshape(-1, *flat.shape[1:])
    records: dict[str, dict[str, Any]] = {}
    fp32_run: Callable[[], None] | None = None
    best = 0
    for amp in precisions:
        if not amp_supported(amp, device):
            continue
        encoder = probe.encoder.eval()
        x = _encoder_input(probe, distinct)
        size, rates = best_batch_size(encoder, x, device, amp, BATCH_SIZES)
        no_grad = meter(encode_all, encoder, x, size, amp)
        encoder.train()
        xk = _encoder_input(probe, kept)
        grad = meter(_grad_pass, encoder, xk, amp, device)
        encoder.zero_grad(set_to_none=True)
        if amp == "none":
            best, fp32_run = size, _floor_run(encoder, x, xk, size, device)
        del x, xk
        records[amp] = emit(floor_record(amp, B, {"no_grad": no_grad, "grad": grad}, size, rates))
    assert fp32_run is not None  # fp32 runs everywhere
    return Floors(records, fp32_run, best)


# ---- the benchmark -------------------------------------------------------------------------


def bench_speed(
    config: Config,
    *,
    input: str = "mnist",
    batch_size: int = 16,
    canvas: int = 1500,
    mnist: str | os.PathLike | None = None,
    num_patches: int = 10000,
    feature_dim: int = 2048,
    variants: Sequence[str] | None = None,
    repeats: int = 3,
    warmup: int = 1,
    full: bool = True,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    seed: int = 0,
    report: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure floor, step, inference and the full baseline for each variant.

    Args:
        config: model and selection settings (the variants change dedup, memory format,
            encoder batch size, precision, compilation). Pixel inputs are held in memory
            (loading "eager"); feature bags are read as the config's ``selection.loading``
            says.
        input: "mnist" or "dense" (see `make_speed_batch`), or "features" (see
            `ips.bench.feature_speed`; needs ``model.encoder: features``).
        batch_size: B.
        canvas: image side of pixel inputs; N = (canvas // P) ** 2.
        mnist: MNIST digits for the "mnist" input.
        num_patches: N of each feature bag.
        feature_dim: F of the feature bags (sets ``model.feature_dim``).
        variants: names from `VARIANTS`; default `DEFAULT_VARIANTS`, for features
            `FEATURE_VARIANTS`.
        repeats: timed repetitions (the median is reported).
        warmup: untimed runs before them.
        full: also measure the no-selection baseline where its memory fits.
        device: where to compute.
        threads: torch CPU threads (default: torch's own choice).
        seed: seed of the inputs, weights and selection order.
        report: called with each record as soon as it is measured.

    Returns:
        Records (dicts), each with at least `SPEED_KEYS`: measure ("floor", "step",
        "infer", "full", "summary"), variant, seconds (median), images_per_second, peak_mb;
        measurements add peak_rss_mb; summary records add the ratios step / floor and
        full / step. For the "default" variant the step record adds ``select_seconds`` (its
        selection alone), ``paired_step_over_floor`` (step / floor of back-to-back pairs of
        runs), whose median its summary carries, and ``paired_seconds`` ([floor s, step s]
        of each pair). Feature records add feature_dim,
        embed_dim, loading, and per measurement ``bytes_read`` and ``read_seconds`` (per
        run; see `ips.bench.feature_speed` for the floor's parts).
    """
    if input not in INPUTS:
        raise InputError(f"input must be one of {INPUTS}, got {input!r}")
    variants = tuple(variants or (FEATURE_VARIANTS if input == "features" else DEFAULT_VARIANTS))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise InputError(f"variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
    if repeats < 1 or warmup < 0:
        raise InputError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(device)
    run = functools.partial(
        _measure_variants,
        variants=variants,
        repeats=repeats,
        warmup=warmup,
        full=full,
        device=device,
        seed=seed,
        report=report,
    )
    if input == "features":
        config = feature_config(config, feature_dim)
        with tempfile.TemporaryDirectory(prefix="ips-bench-speed-") as tmp:
            bags = make_feature_batch(
                config, Path(tmp), batch_size=batch_size, num_patches=num_patches, seed=seed
            )
            try:
                return run(config, bags, input=input)
            finally:
                bags.close()  # before the folder goes
    batch = make_speed_batch(
        config, input=input, batch_size=batch_size, canvas=canvas, mnist=mnist, seed=seed
    )
    return run(config, batch, input=input)


def _measure_variants(
    config: Config,
    batch: SpeedBatch | FeatureSpeedBatch,
    *,
    input: str,
    variants: Sequence[str],
    repeats: int,
    warmup: int,
    full: bool,
    device: torch.device,
    seed: int,
    report: Callable[[dict[str, Any]], None] | None,
) -> list[dict[str, Any]]:
    """The floors, then step and inference of every variant, the baseline and the summaries."""
    B, N = batch.batch_size, batch.num_patches
    sel = config.selection
    common: dict[str, Any] = {
        "input": input,
        "batch_size": B,
        "num_patches": N,
        "memory_size": sel.memory_size,
        "chunk_size": sel.chunk_size,
        "embed_dim": config.model.embed_dim,
        "encoder": config.model.encoder,
    }
    reads: ReadCounter | None
    if isinstance(batch, FeatureSpeedBatch):  # bags read as training reads them
        common.update(feature_dim=batch.feature_dim, loading=sel.loading)
        loading, reads = sel.loading, batch.reads
    else:  # pixels held in memory
        common.update(distinct_patches=batch.distinct, patch_size=config.model.patch_size)
        loading, reads = "eager", None
    common.update(
        device=_device_name(device),
        threads=torch.get_num_threads(),
        native_bf16=native_bf16(device),
        torch=torch.__version__,
    )
    meter = Meter(device, warmup=warmup, repeats=repeats, reads=reads)
    records: list[dict[str, Any]] = []

    def emit(record: dict[str, Any]) -> dict[str, Any]:
        record = {**record, **common}
        records.append(record)
        if report is not None:
            report(record)
        return record

    def measured(timing: Timing) -> dict[str, Any]:
        """The fields every timed record carries beside its seconds."""
        out = {"peak_mb": timing.peak_mb, "peak_rss_mb": timing.peak_rss_mb}
        if reads is not None:
            out.update(bytes_read=timing.bytes_read, read_seconds=timing.read_seconds)
        return out

    precisions = ["none"] + sorted({VARIANTS[v].get("amp", "none") for v in variants} - {"none"})
    torch.manual_seed(seed)
    probe = _build_model(config, VARIANTS["default"], None, device, loading=loading)
    state = {k: v.clone() for k, v in probe.state_dict().items()}
    if isinstance(batch, FeatureSpeedBatch):
        floors = feature_floors(
            probe, batch, precisions=precisions, meter=meter, device=device, seed=seed, emit=emit
        )
    else:
        floors = _pixel_floors(
            probe, batch, precisions=precisions, meter=meter, device=device, seed=seed, emit=emit
        )
    reference_ids: Tensor | None = None
    steps: dict[str, float] = {}
    paired: dict[str, float] = {}
    for name in variants:
        variant = VARIANTS[name]
        amp = variant.get("amp", "none")
        if not amp_supported(amp, device):
            emit(
                {
                    "measure": "step",
                    "variant": name,
                    "seconds": None,
                    "images_per_second": None,
                    "peak_mb": None,
                    "status": f"skipped: {amp} is not supported on {device}",
                }
            )
            continue
        model = _build_model(config, variant, floors.best_batch, device, B, loading)
        model.load_state_dict(state)
        if variant.get("compile"):  # after loading: compiling renames the parameters
            model.encoder = torch.compile(model.encoder, dynamic=True)
        ids = model.select(
            batch.patches,
            grid_shape=batch.grid_shape,
            generator=torch.Generator().manual_seed(seed),
        ).ids
        if reference_ids is None:
            reference_ids = ids
        same = bool(torch.equal(ids, reference_ids))
        train_cfg = TrainConfig(lr=1e-4, warmup_epochs=0, epochs=1, amp=amp)
        optimizer, _ = build_optimizer(model, train_cfg, steps_per_epoch=1)
        step = meter(training_step, model, optimizer, batch, amp=amp, seed=seed)
        infer = meter(_inference, model, batch, amp, seed)
        steps[name] = step.seconds
        split: dict[str, Any] = {}
        if name == "default":
            split["select_seconds"] = round(meter(_selection, model, batch, seed).seconds, 4)
            one_step = functools.partial(training_step, model, optimizer, batch, amp=amp, seed=seed)
            pairs = paired_seconds(one_step, floors.fp32_run, repeats, device)
            ratios = [step_s / floor_s for floor_s, step_s in pairs]
            paired[name] = statistics.median(ratios)
            split["paired_step_over_floor"] = [round(r, 3) for r in ratios]
            split["paired_seconds"] = [[round(f, 6), round(s, 6)] for f, s in pairs]
        emit(
            {
                "measure": "step",
                "variant": name,
                "amp": amp,
                "seconds": round(step.seconds, 4),
                "images_per_second": _rate(B, step.seconds),
                **measured(step),
                "same_selection": same,
                "encoder_batch_size": model._encoder_batch_size(device),
                **split,
            }
        )
        emit(
            {
                "measure": "infer",
                "variant": name,
                "amp": amp,
                "seconds": round(infer.seconds, 4),
                "images_per_second": _rate(B, infer.seconds),
                **measured(infer),
                "same_selection": same,
            }
        )
        del model, optimizer
        gc.collect()
    floor_records = floors.records
    del probe, floors  # the fp32 floor run holds the probe's inputs

    full_record = None
    if full:
        full_record = emit(
            _measure_full(
                config, batch, state, device, meter, floor_records, seed, loading, measured
            )
        )

    for name, seconds in steps.items():
        amp = VARIANTS[name].get("amp", "none")
        floor = floor_records.get(amp)
        full_s = full_record.get("seconds") if full_record else None
        emit(
            {
                "measure": "summary",
                "variant": name,
                "seconds": round(seconds, 4),
                "images_per_second": _rate(B, seconds),
                "peak_mb": None,
                "step_over_floor": _ratio(seconds, floor["seconds"] if floor else None),
                "paired_step_over_floor": (round(paired[name], 3) if name in paired else None),
                "full_over_step": _ratio(full_s, seconds),
                "speedup_over_reference": _ratio(steps.get("reference"), seconds),
            }
        )
    return records


def _measure_full(
    config: Config,
    batch: SpeedBatch | FeatureSpeedBatch,
    state: dict[str, Tensor],
    device: torch.device,
    meter: Meter,
    floors: dict[str, dict[str, Any]],
    seed: int,
    loading: str,
    measured: Callable[[Timing], dict[str, Any]],
) -> dict[str, Any]:
    """The no-selection baseline: all N patches per image with gradients (M >= N)."""
    B, N = batch.batch_size, batch.num_patches
    M = config.selection.memory_size
    record: dict[str, Any] = {
        "measure": "full",
        "variant": "default",
        "seconds": None,
        "images_per_second": None,
        "peak_mb": None,
    }
    floor = floors.get("none")
    if floor and floor.get("peak_mb"):
        # activations grow linearly with the patches encoded with gradients (B x M in the floor)
        needed = floor["peak_mb"] * N / max(M, 1)
        available = _available_mb(device)
        record["estimated_mb"] = round(needed, 1)
        if available is not None and needed > 0.75 * available:
            record["status"] = (
                f"skipped: needs about {needed:,.0f} MiB, {available:,.0f} MiB available"
            )
            return record
    full_config = replace_fields(config, memory_size=N, chunk_size=N)
    model = _build_model(full_config, VARIANTS["default"], None, device, loading=loading)
    model.load_state_dict(state)
    optimizer, _ = build_optimizer(model, TrainConfig(lr=1e-4, warmup_epochs=0, epochs=1), 1)
    timing = meter(training_step, model, optimizer, batch, seed=seed)
    record.update(
        seconds=round(timing.seconds, 4),
        images_per_second=_rate(B, timing.seconds),
        **measured(timing),
        status="ok",
    )
    return record


def _available_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**20
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _rate(images: int, seconds: float | None) -> float | None:
    return None if not seconds else round(images / seconds, 3)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else round(a / b, 3)


# ---- reporting -----------------------------------------------------------------------------


def speed_table(records: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the records: one row per measurement, ratios in the summary rows."""

    def cell(value: Any, digits: int = 2) -> str:
        if value is None:
            return "–"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:,.{digits}f}"
        return str(value)

    head = (
        "measure",
        "variant",
        "s",
        "images/s",
        "peak MiB",
        "same selection",
        "step / floor",
        "paired",
        "full / step",
        "speed-up vs reference",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        seconds = r.get("seconds")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["measure"],
                    str(r["variant"]),
                    cell(seconds, 3) if seconds is not None else r.get("status", "–"),
                    cell(r.get("images_per_second")),
                    cell(r.get("peak_mb"), 1),
                    cell(r.get("same_selection")),
                    cell(r.get("step_over_floor")),
                    cell(r.get("paired_step_over_floor")),
                    cell(r.get("full_over_step")),
                    cell(r.get("speedup_over_reference")),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"
