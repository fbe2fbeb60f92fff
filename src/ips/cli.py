"""``ips <command>``: argument parsing, logging, device choice. Nothing imports this module.

Errors a user can fix (``ips.errors.UserError``: bad paths, configs, inputs) print one line
``ips: error: ...`` and exit with status 2; ``--debug`` shows the traceback instead. Any other
exception is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ips.errors import PREEMPTED_EXIT, ConfigError, MissingFileError, Stopped, UserError

if TYPE_CHECKING:
    from ips.config import Config

log = logging.getLogger("ips")

USER_ERRORS = (  # answered with one line and exit status 2; anything else is a bug
    UserError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return device


def _parents(
    *,
    device: str | None = None,
    progress: bool = False,
    json: str | None = None,
    seed: str | None = None,
    overrides: str | None = None,
) -> list[argparse.ArgumentParser]:
    """The options commands share, as parent parsers: always --debug and -q; with
    ``device`` --device (its default); --no-progress; --json, --seed and --set with a help
    text of their own."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    if device is not None:
        common.add_argument(
            "--device",
            default=device,
            help=f"auto, cpu, cuda, cuda:1, ... (default {device}; torchrun: cuda:LOCAL_RANK)",
        )
    if progress:
        common.add_argument("--no-progress", action="store_true", help="no progress bars")
    if json is not None:
        common.add_argument("--json", action="store_true", help=json)
    if seed is not None:
        common.add_argument("--seed", type=int, default=0, help=f"{seed} (default 0)")
    if overrides is not None:
        common.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help=overrides,
        )
    return [common]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ips",
        description="Iterative Patch Selection for very large images and whole slides.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (
        _add_train,
        _add_eval,
        _add_predict,
        _add_demo,
        _add_make_mnist,
        _add_make_slide,
        _add_make_cohort,
        _add_extract_features,
        _add_encoders,
        _add_download_traffic_signs,
    ):
        add(sub)
    bench = _add_bench(sub)
    _add_bench_memory(bench)
    _add_bench_speed(bench)
    _add_bench_extract(bench)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    if not getattr(args, "debug", False):  # readers raise one clear error of their own
        logging.getLogger("tifffile").setLevel(logging.CRITICAL)


def _add_train(sub: Any) -> None:
    """`ips train`'s options."""
    p = sub.add_parser(
        "train",
        help="train a model from a YAML config",
        parents=_parents(
            device="auto",
            progress=True,
            overrides="override a config value, e.g. --set train.lr=3e-4 (repeatable)",
        ),
    )
    p.add_argument("--config", required=True, help="YAML file, or a shipped config's name")
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, config)")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        type=_resume_mode,
        metavar="auto",
        help="continue from RUN_DIR/last.pt (an error where there is none); --resume auto: "
        "continue where there is one, start otherwise (a job that a scheduler requeues)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        metavar="K",
        help="train in K processes on this machine (one per GPU) through torch.distributed.run; "
        "several machines: torchrun (see the README)",
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=30.0,
        metavar="MINUTES",
        help="several processes: how long one waits for the others before failing",
    )


def _resume_mode(value: str) -> str:
    if value != "auto":
        raise argparse.ArgumentTypeError(f"expected nothing or 'auto', got {value!r}")
    return value


def cmd_train(args: argparse.Namespace) -> int:
    from ips import distributed
    from ips.config import load_config, resolve_config_path
    from ips.train import fit

    _check_positive(args, "nproc")
    if not args.dist_timeout > 0:
        raise ConfigError(f"--dist-timeout must be > 0 minutes, got {args.dist_timeout}")
    config = load_config(resolve_config_path(args.config), args.overrides)
    if args.nproc is not None and args.nproc > 1:
        if distributed.launched():
            raise ConfigError("--nproc starts the processes itself: leave it out under torchrun")
        if not args.resume:  # (a resumed run keeps its stored batch size)
            distributed.micro_batch_size(
                config.train.batch_size, args.nproc, config.train.accumulate
            )
        return _launch_train(args)
    if distributed.launched():
        return _train_in_process_group(args, config)
    summary = fit(
        config,
        args.out,
        resume=args.resume,
        device=_device(args.device),
        progress=not args.no_progress,
    )
    log.info("run folder: %s (best validation score %.4f)", summary["run_dir"], summary["best"])
    return 0


def _launch_train(args: argparse.Namespace) -> int:
    """``ips train --nproc K``: the same command in K processes, through torch's launcher."""
    from ips import distributed

    argv = _without_option(args.argv, "--nproc")
    failures = distributed.launch(argv, nproc=args.nproc)
    if failures and all(f.exit_code == PREEMPTED_EXIT for f in failures):
        print(f"ips: {failures[0].line}", file=sys.stderr)  # every process stopped on a signal
        return PREEMPTED_EXIT
    for failure in failures:  # the first is the cause, later ones may be its echo
        print(f"ips: error: {failure.line}", file=sys.stderr)
    return next((f.exit_code for f in failures if f.exit_code > 0), 1) if failures else 0


def _without_option(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` less ``option VALUE`` / ``option=VALUE`` (or an abbreviation argparse took)."""
    out, skip = [], False
    for token in argv:
        name = token.split("=", 1)[0]
        if skip:
            skip = False
        elif len(name) >= 4 and option.startswith(name):
            skip = "=" not in token
        else:
            out.append(token)
    return out


def _train_in_process_group(args: argparse.Namespace, config: Config) -> int:
    """One of several processes started by torchrun: join the group, train, leave."""
    from datetime import timedelta

    from torch.distributed.elastic.multiprocessing.errors import record

    from ips import distributed
    from ips.train import fit

    @record  # the launcher reports this process's error, traceback included
    def run() -> dict | Stopped:
        timeout = timedelta(minutes=args.dist_timeout)
        device = distributed.init_distributed(_device(args.device), timeout=timeout)
        ranks = distributed.current()
        if not ranks.is_main:  # rank 0 reports progress; the others only their warnings
            logging.basicConfig(
                level=logging.WARNING,
                format=f"[rank {ranks.rank}] %(message)s",
                stream=sys.stderr,
                force=True,
            )
        log.info("process group of %d processes (%s)", ranks.world_size, device.type)
        try:
            summary = fit(
                config, args.out, resume=args.resume, device=device, progress=not args.no_progress
            )
        except Stopped as stopped:  # every process stopped at the same step: not an error
            distributed.shutdown()
            return stopped
        distributed.shutdown()  # after an error the launcher stops every process instead
        return summary

    summary = run()
    if isinstance(summary, Stopped):
        raise summary
    log.info("run folder: %s (best validation score %.4f)", summary["run_dir"], summary["best"])
    return 0


def _add_eval(sub: Any) -> None:
    """`ips eval`'s options."""
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint; prints metrics as JSON",
        parents=_parents(device="auto", progress=True, json="print only the JSON line"),
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", help="dataset path (default: the one the model was trained on)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--out", help="also write the metrics JSON to this file")


def cmd_eval(args: argparse.Namespace) -> int:
    from ips.metrics import nest_metrics
    from ips.train import evaluate_checkpoint, evaluation_settings

    metrics = evaluate_checkpoint(
        args.checkpoint,
        data_path=args.data,
        split=args.split,
        device=_device(args.device),
        progress=not args.no_progress,
    )
    result = {
        args.split: nest_metrics(metrics),
        "checkpoint": str(args.checkpoint),
        "settings": evaluation_settings(args.checkpoint, device=_device(args.device)),
    }
    line = json.dumps(result)
    if args.out:
        from ips.files import write_atomically

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(args.out, line + "\n")
    print(line)
    return 0


def _add_make_mnist(sub: Any) -> None:
    """`ips make-mnist`'s options."""
    p = sub.add_parser(
        "make-mnist",
        help="generate a Megapixel MNIST dataset file",
        parents=_parents(seed="fixes the images"),
    )
    p.add_argument("--out", required=True, help="the .npz file to write")
    p.add_argument(
        "--mnist",
        help="MNIST idx folder or .npz (default: $IPS_MNIST, cache, "
        "download, then scikit-learn's 8x8 digits)",
    )
    p.add_argument("--train", type=int, default=5000, help="training images")
    p.add_argument("--test", type=int, default=1000, help="test images")
    p.add_argument(
        "--canvas",
        type=int,
        nargs="+",
        default=[1500],
        metavar="SIZE",
        help="canvas height [width] in pixels",
    )
    p.add_argument("--noise", type=int, default=50, help="noise patterns per image")


def cmd_make_mnist(args: argparse.Namespace) -> int:
    from ips.data import generate_megapixel_mnist, load_mnist

    if len(args.canvas) not in (1, 2):
        raise ConfigError(f"--canvas takes a size or height and width, got {args.canvas}")
    canvas = (args.canvas[0], args.canvas[-1])
    digits = load_mnist(args.mnist)
    path = generate_megapixel_mnist(
        args.out,
        digits,
        num_train=args.train,
        num_test=args.test,
        canvas_size=canvas,
        num_noise=args.noise,
        seed=args.seed,
    )
    log.info(
        "wrote %s (%d train / %d test images of %d x %d, digits from %s)",
        path,
        args.train,
        args.test,
        canvas[0],
        canvas[1],
        digits.source,
    )
    return 0


def _add_predict(sub: Any) -> None:
    """`ips predict`'s options."""
    p = sub.add_parser(
        "predict",
        help="predict images, slides, tables of them or feature bags; write tables, heatmaps, "
        "GeoJSON",
        parents=_parents(device="auto", progress=True, seed="seed of the selection order"),
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image/slide/feature-bag files, folders, or .csv/.tsv tables (path column; task "
        "columns give metrics.json)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=1, help="images per step")
    p.add_argument("--memory-size", type=int, help="M for inference (default: the checkpoint's)")
    p.add_argument("--chunk-size", type=int, help="I for inference (default: the checkpoint's)")
    p.add_argument(
        "--scale", default="rank", choices=["linear", "rank", "log"], help="heatmap colour scale"
    )
    p.add_argument(
        "--gallery", type=int, default=16, metavar="K", help="patches in gallery.png (0: none)"
    )
    p.add_argument("--no-pictures", action="store_true", help="only tables and GeoJSON")
    p.add_argument(
        "--split", choices=["train", "val", "test"], help="of a table's rows, only this split"
    )
    g = p.add_argument_group(
        "grid", "how images are cut; default: as the checkpoint's training cut them (data.grid)"
    )
    g.add_argument(
        "--tissue",
        help="none, otsu, mask (a table's mask column), or a mask image / GeoJSON for the inputs",
    )
    g.add_argument("--min-tissue", type=float, help="lowest tissue fraction of a kept patch")
    g.add_argument("--level", type=int, help="pyramid level to read")
    g.add_argument("--downsample", type=float, help="read at this many level-0 pixels per pixel")
    g.add_argument("--target-mpp", type=float, help="read at this many microns per pixel")
    g.add_argument("--mpp", type=float, help="level-0 microns per pixel (overrides the file)")
    g.add_argument("--stride", type=int, help="patch stride in read pixels")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first input that fails")


def cmd_predict(args: argparse.Namespace) -> int:
    from ips.config import TISSUE_MODES
    from ips.predict import run_predict

    grid = {
        "stride": args.stride,
        "level": args.level,
        "downsample": args.downsample,
        "target_mpp": args.target_mpp,
        "mpp": args.mpp,
        "min_tissue": args.min_tissue,
    }
    mask = None
    if args.tissue in TISSUE_MODES:
        grid["tissue"] = args.tissue
    elif args.tissue is not None:  # one mask file for the inputs
        mask = args.tissue
        if not Path(mask).is_file():
            raise MissingFileError(f"--tissue {mask}: no such mask file (or none, otsu, mask)")
    summary = run_predict(
        args.checkpoint,
        args.inputs,
        args.out,
        device=_device(args.device),
        batch_size=args.batch_size,
        memory_size=args.memory_size,
        chunk_size=args.chunk_size,
        scale=args.scale,
        gallery_k=args.gallery,
        heatmaps=not args.no_pictures,
        grid_overrides=grid,
        mask=mask,
        split=args.split,
        seed=args.seed,
        on_error="fail" if args.fail_fast else "skip",
        progress=not args.no_progress,
    )
    if summary["failed"]:  # each was logged as it happened; one line to close the run
        print(
            f"ips: {len(summary['failed'])} of {summary['inputs']} inputs failed and were "
            f"skipped (each reported above; errors in {summary['predictions_csv']})",
            file=sys.stderr,
        )
    log.info(
        "%d of %d inputs predicted: %s",
        summary["succeeded"],
        summary["inputs"],
        summary["predictions_csv"],
    )
    if summary["metrics_json"]:
        log.info("metrics against the table's labels: %s", summary["metrics_json"])
    return 1 if summary["failed"] else 0


def _add_demo(sub: Any) -> None:
    """`ips demo`'s options."""
    p = sub.add_parser(
        "demo",
        help="generate data, train on the CPU, evaluate, draw pictures",
        parents=_parents(device="auto", progress=True, json="last line: test metrics as JSON"),
    )
    p.add_argument("--out", default="runs/demo", help="demo folder")
    p.add_argument("--mnist", help="MNIST idx folder or .npz (see make-mnist)")


def cmd_demo(args: argparse.Namespace) -> int:
    from ips.demo import run_demo

    result = run_demo(
        args.out, mnist=args.mnist, device=_device(args.device), progress=not args.no_progress
    )
    if args.json:
        print(json.dumps({"test": result["test"], "run_dir": result["run_dir"]}))
    return 0


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    """Raise a ValueError naming the option when one of `names` is set and below 1."""
    for name in names:
        value = getattr(args, name)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v is not None and v < 1:
                option = "--" + name.replace("_", "-")
                raise ConfigError(f"{option} must be >= 1, got {v}")


def _add_make_slide(sub: Any) -> None:
    """`ips make-slide`'s options."""
    p = sub.add_parser(
        "make-slide",
        help="write a synthetic pyramidal slide (tiled BigTIFF)",
        parents=_parents(seed="fixes the picture"),
    )
    p.add_argument("--out", required=True, help="the .tif file to write")
    p.add_argument("--width", type=int, required=True, help="level-0 width in pixels")
    p.add_argument("--height", type=int, required=True, help="level-0 height in pixels")
    p.add_argument("--tile", type=int, default=256, help="tile side, a multiple of 16")
    p.add_argument("--mpp", type=float, default=0.5, help="microns per level-0 pixel")
    p.add_argument("--lesions", type=int, default=0, help="darker lesion regions in the tissue")
    p.add_argument("--blank", action="store_true", help="glass only, no tissue")


def cmd_make_slide(args: argparse.Namespace) -> int:
    from ips.sources import write_synthetic_slide

    _check_positive(args, "width", "height", "tile")
    if args.tile % 16:
        raise ConfigError(f"--tile must be a multiple of 16, got {args.tile}")
    if not args.mpp > 0:
        raise ConfigError(f"--mpp must be > 0, got {args.mpp}")
    if args.lesions < 0:
        raise ConfigError(f"--lesions must be >= 0, got {args.lesions}")
    if args.blank and args.lesions:
        raise ConfigError("--lesions needs tissue: leave out --blank")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    slide = write_synthetic_slide(
        out,
        width=args.width,
        height=args.height,
        tile_size=args.tile,
        mpp=args.mpp,
        seed=args.seed,
        lesions=args.lesions,
        tissue_blobs=0 if args.blank else None,
    )
    log.info(
        "wrote %s (%d x %d, %d levels, tiles of %d, %g um/px, %d lesions)",
        slide.path,
        slide.width,
        slide.height,
        slide.levels,
        slide.tile_size,
        slide.mpp,
        len(slide.lesion_boxes),
    )
    return 0


def _add_make_cohort(sub: Any) -> None:
    """`ips make-cohort`'s options."""
    p = sub.add_parser(
        "make-cohort",
        help="write a synthetic slide cohort and its labels table (slides with/without lesions)",
        description="Writes OUT/slides/slide_NNN.tif (pyramidal BigTIFFs) and OUT/labels.csv "
        "(path, lesion, split): a binary task on slides of which a share carries small dark "
        "lesions in the tissue, split stratified into train, val and test.",
        parents=_parents(seed="fixes the cohort"),
    )
    p.add_argument("--out", required=True, help="the cohort folder")
    p.add_argument("--slides", type=int, default=64, help="number of slides")
    p.add_argument("--size", type=int, default=8192, help="level-0 side of each slide, pixels")
    p.add_argument("--positive", type=float, default=0.5, help="share of slides with lesions")
    p.add_argument("--val", type=float, default=0.125, help="share of each class for val")
    p.add_argument("--test", type=float, default=0.25, help="share of each class for test")
    p.add_argument("--mpp", type=float, default=0.5, help="microns per level-0 pixel")


def cmd_make_cohort(args: argparse.Namespace) -> int:
    from ips.data.cohort import write_synthetic_cohort

    _check_positive(args, "slides", "size")
    table = write_synthetic_cohort(
        args.out,
        slides=args.slides,
        size=args.size,
        positive=args.positive,
        val=args.val,
        test=args.test,
        mpp=args.mpp,
        seed=args.seed,
    )
    log.info("wrote %d slides of %d x %d and %s", args.slides, args.size, args.size, table)
    return 0


def _add_extract_features(sub: Any) -> None:
    """`ips extract-features`'s options."""
    p = sub.add_parser(
        "extract-features",
        help="encode the tissue tiles of slides: one HDF5 feature bag per slide",
        description="Tissue detection, tiles of --patch-size pixels at --level or --target-mpp, "
        "batched encoding; writes OUT/<slide>.h5 (features (N, F), coords (N, 2) level-0) and "
        "OUT/extraction_summary.json. Slides with a bag are skipped (resume); a slide that "
        "fails is reported and skipped. Under torchrun each process takes every K-th slide "
        "and writes extraction_summary.rank<r>.json.",
        parents=_parents(device="auto", progress=True, seed="initialises an untrained encoder"),
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="slide files, folders (a CAMELYON16 folder gives all its slides), .txt slide lists",
    )
    p.add_argument("--out", required=True, help="folder of feature bags")
    p.add_argument(
        "--encoder",
        default="resnet50_4blocks",
        help="a registered pixel encoder (resnet18_2blocks, resnet50_4blocks, ...) or "
        "timm:<model> (needs the timm extra)",
    )
    p.add_argument(
        "--weights",
        help="a weights file (.bin, .pth, .safetensors; loaded strictly), or 'hub' / 'imagenet' "
        "(the published weights, downloaded once; HF_TOKEN for gated ones); default untrained",
    )
    p.add_argument("--patch-size", type=int, default=256, help="tile side in read pixels")
    g = p.add_argument_group("grid", "how slides are cut into tiles")
    g.add_argument("--level", type=int, help="pyramid level to read (default 0)")
    g.add_argument("--downsample", type=float, help="read at this many level-0 pixels per pixel")
    g.add_argument("--target-mpp", type=float, help="read at this many microns per pixel")
    g.add_argument("--mpp", type=float, help="level-0 microns per pixel (overrides the file)")
    g.add_argument("--stride", type=int, help="tile step in read pixels (default: the tile side)")
    g.add_argument(
        "--tissue", default="otsu", choices=["otsu", "none"], help="tissue detection ('none': all)"
    )
    g.add_argument("--min-tissue", type=float, default=0.01, help="least tissue share of a tile")
    p.add_argument(
        "--batch-size",
        type=int,
        help="tiles per encoder call (default on a CPU: a preset's fastest, else 16; else 64)",
    )
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes reading tiles")
    p.add_argument(
        "--amp",
        default="auto",
        choices=["auto", "none", "bf16", "fp16"],
        help="autocast; auto: bf16 where the device has bf16 units (the bags record which)",
    )
    p.add_argument(
        "--coords-from",
        metavar="DIR",
        help="take each slide's tiles from its bag in DIR (ours, CLAM's or TRIDENT's .h5 with "
        "coords) instead of a new grid",
    )


def cmd_extract_features(args: argparse.Namespace) -> int:
    import os

    from ips import distributed
    from ips.config import GridConfig
    from ips.features import extract_features

    _check_positive(args, "patch_size", "batch_size")
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")
    device = _device(args.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = _device(f"cuda:{distributed.from_environment().local_rank}")  # one GPU each
    grid = GridConfig(
        stride=args.stride,
        level=args.level,
        downsample=args.downsample,
        target_mpp=args.target_mpp,
        mpp=args.mpp,
        tissue=args.tissue,
        min_tissue=args.min_tissue,
    )
    summary = extract_features(
        args.inputs,
        args.out,
        encoder=args.encoder,
        weights=args.weights,
        patch_size=args.patch_size,
        grid=grid,
        amp=args.amp,
        coords_from=args.coords_from,
        seed=args.seed,
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=device,
        progress=not args.no_progress,
    )
    if summary["failed"]:  # each was logged as it happened; one line to close the run
        print(
            f"ips: {len(summary['failed'])} slide(s) failed and were skipped (each reported "
            f"above; errors in {summary['summary']})",
            file=sys.stderr,
        )
    log.info(
        "%d slides extracted, %d already done, %d failed; summary: %s",
        len(summary["extracted"]),
        len(summary["skipped"]),
        len(summary["failed"]),
        summary["summary"],
    )
    return 1 if summary["failed"] else 0


def _add_encoders(sub: Any) -> None:
    """`ips encoders`'s options."""
    sub.add_parser(
        "encoders",
        help="list the patch encoders: foundation models, ResNet trunks, ...",
        parents=_parents(json="one JSON object per encoder"),
    )


def cmd_encoders(args: argparse.Namespace) -> int:
    from ips.encoders import NOT_BUILT, PRESETS, list_encoders

    rows = []
    for name in list_encoders():
        entry = PRESETS.get(name)
        if entry is None:
            rows.append(
                {"name": name, "kind": "torchvision / ips" if name != "features" else "features"}
            )
            continue
        rows.append(
            {
                "name": name,
                "kind": f"timm {entry.arch}" + (f" + {entry.tower}" if entry.tower else ""),
                "width": entry.width,
                "input": entry.input_size,
                "embedding": entry.embedding,
                "mean": list(entry.mean),
                "std": list(entry.std),
                "weights": entry.hub_id or entry.url,
                "gated": entry.gated,
            }
        )
    rows.append({"name": "timm:<model>", "kind": "any timm model, its own pretrained config"})
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    for row in rows:
        extra = ""
        if "width" in row:
            gate = ", gated" if row["gated"] else ""
            extra = f"  F={row['width']}, {row['input']} px, {row['embedding']}"
            extra += f", weights: {row['weights'] or 'a local file'}{gate}"
        print(f"{row['name']:<18} {row['kind']}{extra}")
    for name, why in NOT_BUILT.items():
        print(f"{name:<18} not built: {why}")
    return 0


def _add_download_traffic_signs(sub: Any) -> None:
    """`ips download-traffic-signs`'s options."""
    p = sub.add_parser(
        "download-traffic-signs",
        help="fetch the Swedish traffic signs sets 1 and 2 (HTTPS, SHA-256 checked)",
        parents=_parents(),
    )
    p.add_argument("--out", required=True, help="dataset folder (Set1/, Set2/ go here)")
    p.add_argument(
        "--sha256",
        help="sha256sum listing of the files (Set1/annotations.txt, Set1/Set1Part0.zip, ...); "
        "default: the digests shipped with ips",
    )


def cmd_download_traffic_signs(args: argparse.Namespace) -> int:
    from ips.data.traffic_signs import download_traffic_signs

    root = download_traffic_signs(args.out, sha256=args.sha256)
    log.info("Swedish traffic signs (sets 1 and 2) in %s", root)
    return 0


def _add_bench(sub: Any) -> Any:
    """`ips bench`'s options."""
    p = sub.add_parser(
        "bench", help="measurements (see: ips bench memory --help)", parents=_parents()
    )
    p.set_defaults(print_bench_help=p.print_help)
    bench = p.add_subparsers(dest="bench_command", metavar="MEASUREMENT")
    return bench


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench_command is None:
        args.print_bench_help()
        return 2
    return BENCH_COMMANDS[args.bench_command](args)


def _add_bench_memory(bench: Any) -> None:
    """`ips bench memory`'s options."""
    p = bench.add_parser(
        "memory",
        help="peak memory and time of one training step for increasing N",
        description="Peak resident memory and wall time of one training step (selection, "
        "forward, backward, optimizer step) of B images, for increasing N; each measurement "
        "runs in a fresh process.",
        parents=_parents(
            device="cpu", json="print one JSON line per measurement", seed="random seed"
        ),
    )
    p.add_argument(
        "--input",
        choices=["pixels", "features"],
        default="features",
        help="pixels: synthetic slides read lazily; features: an N x F .npy file read lazily",
    )
    p.add_argument(
        "--num-patches",
        type=int,
        nargs="+",
        metavar="N",
        help="patches per image (default 1000 10000 100000 250000)",
    )
    p.add_argument(
        "--methods", nargs="+", choices=["ips", "full"], default=["ips", "full"], help="methods"
    )
    p.add_argument("--batch-size", type=int, default=2, help="B: images per step")
    p.add_argument("--memory-size", type=int, default=100, help="M")
    p.add_argument("--chunk-size", type=int, default=100, help="I")
    p.add_argument("--patch-size", type=int, default=32, help="P: patch side (pixels)")
    p.add_argument("--feature-dim", type=int, default=512, help="F: feature width (features)")
    p.add_argument("--embed-dim", type=int, default=128, help="D")
    p.add_argument(
        "--full-max", type=int, default=10000, help="run the 'full' method only for N <= this"
    )
    p.add_argument("--slide", help="your slide instead of generated ones (N = tissue patches)")
    p.add_argument("--tissue", default="otsu", help="tissue filter of --slide (or a mask path)")
    p.add_argument(
        "--encoder-batch-size", type=int, help="patches per encoder call during selection"
    )
    p.add_argument("--encoder", help="pixel encoder (default resnet18_2blocks; ips encoders)")
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute the encoder's activations in backward (train.activation_checkpointing)",
    )
    p.add_argument("--tile-cache-mb", type=float, default=8.0, help="slide reader tile cache")
    p.add_argument("--timeout", type=float, help="seconds allowed per measurement")
    p.add_argument("--workdir", help="keep generated inputs here and reuse them")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: one per core)")
    p.add_argument("--out", help="folder for results.jsonl and memory.png")


def cmd_bench_memory(args: argparse.Namespace) -> int:
    from ips.bench import bench_memory, memory_table, plot_memory
    from ips.bench.memory import PIXEL_ENCODER, POSITIVE_FIELDS
    from ips.encoders import list_encoders

    _check_positive(args, "num_patches", "encoder_batch_size", *POSITIVE_FIELDS)
    if args.full_max < 0:
        raise ConfigError(f"--full-max must be >= 0, got {args.full_max}")
    if args.timeout is not None and not args.timeout > 0:
        raise ConfigError(f"--timeout must be > 0, got {args.timeout}")
    if args.tile_cache_mb < 0:
        raise ConfigError(f"--tile-cache-mb must be >= 0, got {args.tile_cache_mb}")
    if args.slide is not None:
        if not Path(args.slide).exists():
            raise MissingFileError(f"--slide {args.slide}: no such file")
        if args.input != "pixels":
            raise ConfigError("--slide needs --input pixels")
        if args.num_patches is not None:
            raise ConfigError("--num-patches and --slide exclude each other (N = tissue patches)")
    encoder = args.encoder or PIXEL_ENCODER
    if args.input == "pixels" and encoder not in list_encoders():
        known = ", ".join(list_encoders())
        raise ConfigError(f"--encoder {encoder!r}: no such encoder (known: {known})")
    device = _device(args.device)

    def report(record: dict) -> None:
        if args.json:
            print(json.dumps(record), flush=True)
        log.info(
            "%s %s N=%d: peak %s MiB, %s MiB above baseline, %s s (%s)",
            record["method"],
            record["input"],
            record["num_patches"],
            record["peak_rss_mb"],
            record["peak_rss_above_baseline_mb"],
            record["seconds"],
            record["status"],
        )

    records = bench_memory(
        input=args.input,
        num_patches=args.num_patches,
        methods=args.methods,
        batch_size=args.batch_size,
        memory_size=args.memory_size,
        chunk_size=args.chunk_size,
        patch_size=args.patch_size,
        feature_dim=args.feature_dim,
        embed_dim=args.embed_dim,
        full_max=args.full_max,
        slide=args.slide,
        tissue=args.tissue,
        encoder_batch_size=args.encoder_batch_size,
        encoder=encoder,
        activation_checkpointing=args.activation_checkpointing,
        tile_cache_mb=args.tile_cache_mb,
        device=str(device),
        threads=args.threads,
        seed=args.seed,
        timeout=args.timeout,
        workdir=args.workdir,
        on_record=report,
    )
    if not args.json:
        print(memory_table(records))
    if args.out:
        out = _write_records(args.out, records)
        plot_memory(records, out / "memory.png")
        log.info("wrote %s and %s", out / "results.jsonl", out / "memory.png")
    return 0


def _add_bench_speed(bench: Any) -> None:
    """`ips bench speed`'s options."""
    p = bench.add_parser(
        "speed",
        help="IPS training and inference speed against the encoder's compute floor",
        description="In one process, after warm-up, the median time of: the compute floor "
        "(the encoder on the distinct patches without gradients at its best batch size, plus "
        "forward and backward of the B x M selected patches; for feature bags also reading "
        "every row, and pooling and heads in the gradient pass), the IPS training step, "
        "inference, and the no-selection baseline where it fits; once per speed option "
        "(variant), so the speed-up of each is measured separately.",
        parents=_parents(
            device="cpu",
            json="print one JSON line per measurement",
            seed="random seed",
            overrides="override a config value, e.g. --set selection.memory_size=50 (repeatable)",
        ),
    )
    p.add_argument(
        "--config",
        help="YAML file or shipped config name (default: megapixel_mnist; camelyon16 for "
        "--input features)",
    )
    p.add_argument(
        "--input",
        choices=["mnist", "dense", "features"],
        default="mnist",
        help="mnist: Megapixel MNIST images; dense: random pixels, no patch repeated; "
        "features: B HDF5 feature bags of N random rows, read lazily",
    )
    p.add_argument("--mnist", help="MNIST idx folder or .npz (default: $IPS_MNIST, ...)")
    p.add_argument("--batch-size", type=int, default=16, help="B: images per step")
    p.add_argument("--canvas", type=int, help="image side; N = (canvas // P)^2 (default 1500)")
    p.add_argument(
        "--num-patches", type=int, metavar="N", help="N: rows per feature bag (default 10000)"
    )
    p.add_argument(
        "--feature-dim", type=int, metavar="F", help="F: feature width of the bags (default 2048)"
    )
    p.add_argument(
        "--variants",
        nargs="+",
        help="speed options to measure, from: reference channels_last dedup default "
        "micro_batch bf16 fp16 compile (default: all but compile, and for features all but "
        "compile and channels_last; fp16 needs CUDA)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--no-full", action="store_true", help="skip the no-selection baseline")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", help="folder for results.jsonl and table.md")


def cmd_bench_speed(args: argparse.Namespace) -> int:
    from ips.config import load_config, resolve_config_path

    _check_positive(
        args, "batch_size", "canvas", "num_patches", "feature_dim", "repeats", "threads"
    )
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    features = args.input == "features"
    for option, value, wanted in (
        ("--num-patches", args.num_patches, True),
        ("--feature-dim", args.feature_dim, True),
        ("--canvas", args.canvas, False),
        ("--mnist", args.mnist, False),
    ):
        if value is not None and wanted != features:
            needs = "--input features" if wanted else "a pixel --input (mnist, dense)"
            raise ConfigError(f"{option} is for {needs}, got --input {args.input}")
    default_config = "camelyon16" if features else "megapixel_mnist"
    config = load_config(resolve_config_path(args.config or default_config), args.overrides)
    device = _device(args.device)

    from ips.bench import bench_speed, speed_table

    def report(record: dict) -> None:
        if args.json:
            print(json.dumps(record), flush=True)
        log.info(
            "%s %s: %s s, %s images/s, peak %s MiB%s",
            record["measure"],
            record["variant"],
            record["seconds"],
            record["images_per_second"],
            record["peak_mb"],
            f" ({record['status']})" if record.get("status", "ok") != "ok" else "",
        )

    records = bench_speed(
        config,
        input=args.input,
        batch_size=args.batch_size,
        canvas=args.canvas or 1500,
        mnist=args.mnist,
        num_patches=args.num_patches or 10000,
        feature_dim=args.feature_dim or 2048,
        variants=args.variants,
        repeats=args.repeats,
        warmup=args.warmup,
        full=not args.no_full,
        device=device,
        threads=args.threads,
        seed=args.seed,
        report=report,
    )
    table = speed_table(records)
    if not args.json:
        print(table)
    if args.out:
        _write_records(args.out, records, table)
    return 0


def _add_bench_extract(bench: Any) -> None:
    """`ips bench extract`'s options."""
    p = bench.add_parser(
        "extract",
        help="feature-extraction tiles/s against its decode and encode floors",
        description="In one process: the encoder alone on resident tiles (each batch size), "
        "the reader alone through extraction's DataLoader (each worker count), and "
        "ips extract-features itself on the slide (each worker count), as tiles/s; the "
        "pipeline over min(decode, encode).",
        parents=_parents(device="cpu", json="print one JSON line per measurement"),
    )
    p.add_argument("--slide", help="the slide (default: a generated one of --size)")
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=(8192, 8192),
        metavar=("W", "H"),
        help="generated slide size in pixels (default 8192 8192)",
    )
    p.add_argument("--encoder", default="resnet50_4blocks", help="encoder (ips encoders)")
    p.add_argument("--weights", help="none (untrained, the default), imagenet, hub or a file")
    p.add_argument("--patch-size", type=int, default=256, help="P: tile side (default 256)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="encoder batch sizes to try")
    p.add_argument("--workers", type=int, nargs="+", help="DataLoader worker counts to try")
    p.add_argument(
        "--amp", default="none", choices=["none", "bf16", "fp16"], help="encoder autocast"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", help="folder for results.jsonl and table.md")


def cmd_bench_extract(args: argparse.Namespace) -> int:
    import tempfile

    import torch

    from ips.bench.extraction import (
        EXTRACT_BATCH_SIZES,
        EXTRACT_WORKERS,
        bench_extraction,
        extraction_table,
    )

    _check_positive(args, "patch_size", "threads")
    if min(args.size) < args.patch_size:
        raise ConfigError(f"--size {args.size}: each side must be >= --patch-size")
    if args.slide is not None and not Path(args.slide).exists():
        raise MissingFileError(f"--slide {args.slide}: no such file")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = _device(args.device)

    def report(record: dict) -> None:
        if args.json:
            print(json.dumps(record), flush=True)
        if record["measure"] != "summary":
            log.info(
                "%s batch %s workers %s: %s tiles/s",
                record["measure"],
                record.get("batch_size", "-"),
                record.get("workers", "-"),
                record["tiles_per_second"],
            )

    with tempfile.TemporaryDirectory(prefix="ips-bench-extract-slide-") as tmp:
        slide = args.slide
        if slide is None:
            from ips.sources import write_synthetic_slide

            width, height = args.size
            slide = Path(tmp) / f"generated_{width}x{height}.tif"
            write_synthetic_slide(slide, width=width, height=height, seed=0)
        records = bench_extraction(
            slide,
            encoder=args.encoder,
            weights=None if args.weights in (None, "none") else args.weights,
            patch_size=args.patch_size,
            batch_sizes=args.batch_sizes or EXTRACT_BATCH_SIZES,
            workers=args.workers if args.workers is not None else EXTRACT_WORKERS,
            device=str(device),
            amp=args.amp,
            on_record=report,
        )
    table = extraction_table(records)
    if not args.json:
        print(table)
    if args.out:
        _write_records(args.out, records, table + "\n")
    return 0


def _write_records(folder: str, records: Sequence[dict], table: str | None = None) -> Path:
    """Write a benchmark's records to FOLDER/results.jsonl (one JSON line each) and, when
    given, its table to FOLDER/table.md, each atomically; returns the folder."""
    from ips.files import write_atomically

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    if table is not None:
        write_atomically(out / "table.md", table)
        log.info("wrote %s and %s", out / "results.jsonl", out / "table.md")
    return out


BENCH_COMMANDS = {
    "memory": cmd_bench_memory,
    "speed": cmd_bench_speed,
    "extract": cmd_bench_extract,
}

COMMANDS = {
    "train": cmd_train,
    "predict": cmd_predict,
    "eval": cmd_eval,
    "make-mnist": cmd_make_mnist,
    "demo": cmd_demo,
    "make-slide": cmd_make_slide,
    "make-cohort": cmd_make_cohort,
    "extract-features": cmd_extract_features,
    "encoders": cmd_encoders,
    "download-traffic-signs": cmd_download_traffic_signs,
    "bench": cmd_bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for ips train --nproc
    if args.version:
        from ips.version import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    _setup_logging(args)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("ips: interrupted", file=sys.stderr)
        return 130
    except Stopped as stopped:  # training stopped early, its checkpoint written
        print(f"ips: {stopped}", file=sys.stderr)
        return stopped.exit_status
    except USER_ERRORS as err:
        if args.debug:
            raise
        from ips.errors import one_line

        print(f"ips: error: {one_line(err)}", file=sys.stderr)
        return 2
