"""``ips <command>``: argument parsing, logging, device choice. Nothing imports this module.

Errors a user can fix (bad paths, configs, inputs) print one line ``ips: error: ...`` and exit
with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("ips")

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, ImportError, FloatingPointError)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ips",
        description="Iterative Patch Selection for very large images and whole slides.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("--config", required=True, help="YAML file, or a shipped config's name")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)",
    )
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, config)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _common(p)

    p = sub.add_parser("eval", help="evaluate a checkpoint; prints metrics as JSON")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", help="dataset path (default: the one the model was trained on)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--out", help="also write the metrics JSON to this file")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    _common(p)

    p = sub.add_parser("make-mnist", help="generate a Megapixel MNIST dataset file")
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
    p.add_argument("--seed", type=int, default=0)
    _common(p)

    p = sub.add_parser(
        "predict", help="predict images, slides or feature bags; write tables, heatmaps, GeoJSON"
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image/slide/feature-bag files or folders"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="auto")
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
    p.add_argument("--tissue", help="'otsu' or a mask image / GeoJSON path")
    p.add_argument("--min-tissue", type=float, help="lowest tissue fraction of a kept patch")
    p.add_argument("--level", type=int, help="pyramid level to read")
    p.add_argument("--target-mpp", type=float, help="read at this many microns per pixel")
    p.add_argument("--mpp", type=float, help="level-0 microns per pixel (overrides the file)")
    p.add_argument("--stride", type=int, help="patch stride in read pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the selection order")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first input that fails")
    p.add_argument("--no-progress", action="store_true")
    _common(p)

    p = sub.add_parser("demo", help="generate data, train on the CPU, evaluate, draw pictures")
    p.add_argument("--out", default="runs/demo", help="demo folder")
    p.add_argument("--mnist", help="MNIST idx folder or .npz (see make-mnist)")
    p.add_argument("--json", action="store_true", help="last line: test metrics as JSON")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    _common(p)

    p = sub.add_parser("make-slide", help="write a synthetic pyramidal slide (tiled BigTIFF)")
    p.add_argument("--out", required=True, help="the .tif file to write")
    p.add_argument("--width", type=int, required=True, help="level-0 width in pixels")
    p.add_argument("--height", type=int, required=True, help="level-0 height in pixels")
    p.add_argument("--tile", type=int, default=256, help="tile side, a multiple of 16")
    p.add_argument("--mpp", type=float, default=0.5, help="microns per level-0 pixel")
    p.add_argument("--lesions", type=int, default=0, help="darker lesion regions in the tissue")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blank", action="store_true", help="glass only, no tissue")
    _common(p)

    p = sub.add_parser("bench", help="measurements (see: ips bench memory --help)")
    p.set_defaults(print_bench_help=p.print_help)
    bench = p.add_subparsers(dest="bench_command", metavar="MEASUREMENT")
    p = bench.add_parser(
        "memory",
        help="peak memory and time of one training step for increasing N",
        description="Peak resident memory and wall time of one training step (selection, "
        "forward, backward, optimizer step) of B images, for increasing N; each measurement "
        "runs in a fresh process.",
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
    p.add_argument("--tile-cache-mb", type=float, default=8.0, help="slide reader tile cache")
    p.add_argument("--timeout", type=float, help="seconds allowed per measurement")
    p.add_argument("--workdir", help="keep generated inputs here and reuse them")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto, ...")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: one per core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line per measurement")
    p.add_argument("--out", help="folder for results.jsonl and memory.png")
    _common(p)

    p = bench.add_parser(
        "speed",
        help="IPS training and inference speed against the encoder's compute floor",
        description="In one process, after warm-up, the median time of: the compute floor "
        "(the encoder on the distinct patches without gradients at its best batch size, plus "
        "forward and backward of the B x M selected patches), the IPS training step, "
        "inference, and the no-selection baseline where it fits; once per speed option "
        "(variant), so the speed-up of each is measured separately.",
    )
    p.add_argument("--config", default="megapixel_mnist", help="YAML file or shipped config name")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set selection.memory_size=50 (repeatable)",
    )
    p.add_argument(
        "--input",
        choices=["mnist", "dense"],
        default="mnist",
        help="mnist: Megapixel MNIST images; dense: random pixels, no patch repeated",
    )
    p.add_argument("--mnist", help="MNIST idx folder or .npz (default: $IPS_MNIST, ...)")
    p.add_argument("--batch-size", type=int, default=16, help="B: images per step")
    p.add_argument("--canvas", type=int, default=1500, help="image side; N = (canvas // P)^2")
    p.add_argument(
        "--variants",
        nargs="+",
        help="speed options to measure, from: reference channels_last dedup default "
        "micro_batch bf16 compile (default: all but compile)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--no-full", action="store_true", help="skip the no-selection baseline")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto, ...")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line per measurement")
    p.add_argument("--out", help="folder for results.jsonl and table.md")
    _common(p)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)


def cmd_train(args: argparse.Namespace) -> int:
    from ips.config import load_config, resolve_config_path
    from ips.train import fit

    config = load_config(resolve_config_path(args.config), args.overrides)
    summary = fit(
        config,
        args.out,
        resume=args.resume,
        device=_device(args.device),
        progress=not args.no_progress,
    )
    log.info("run folder: %s (best validation score %.4f)", summary["run_dir"], summary["best"])
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ips.train import evaluate_checkpoint, nest_metrics

    metrics = evaluate_checkpoint(
        args.checkpoint,
        data_path=args.data,
        split=args.split,
        device=_device(args.device),
        progress=not args.no_progress,
    )
    result = {args.split: nest_metrics(metrics), "checkpoint": str(args.checkpoint)}
    line = json.dumps(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    print(line)
    return 0


def cmd_make_mnist(args: argparse.Namespace) -> int:
    from ips.data import generate_megapixel_mnist, load_mnist

    if len(args.canvas) not in (1, 2):
        raise ValueError(f"--canvas takes a size or height and width, got {args.canvas}")
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


def cmd_predict(args: argparse.Namespace) -> int:
    from ips.predict import run_predict

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
        tissue=args.tissue,
        min_tissue=args.min_tissue,
        level=args.level,
        target_mpp=args.target_mpp,
        mpp=args.mpp,
        stride=args.stride,
        seed=args.seed,
        on_error="fail" if args.fail_fast else "skip",
        progress=not args.no_progress,
    )
    for failed in summary["failed"]:
        print(f"ips: skipped {failed['path']}: {failed['error']}", file=sys.stderr)
    log.info(
        "%d of %d inputs predicted: %s",
        summary["succeeded"],
        summary["inputs"],
        summary["predictions_csv"],
    )
    return 1 if summary["failed"] else 0


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
                raise ValueError(f"{option} must be >= 1, got {v}")


def cmd_make_slide(args: argparse.Namespace) -> int:
    from ips.sources import write_synthetic_slide

    _check_positive(args, "width", "height", "tile")
    if args.tile % 16:
        raise ValueError(f"--tile must be a multiple of 16, got {args.tile}")
    if not args.mpp > 0:
        raise ValueError(f"--mpp must be > 0, got {args.mpp}")
    if args.lesions < 0:
        raise ValueError(f"--lesions must be >= 0, got {args.lesions}")
    if args.blank and args.lesions:
        raise ValueError("--lesions needs tissue: leave out --blank")
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


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench_command is None:
        args.print_bench_help()
        return 2
    return BENCH_COMMANDS[args.bench_command](args)


def cmd_bench_memory(args: argparse.Namespace) -> int:
    from ips.bench import bench_memory, memory_table, plot_memory

    _check_positive(
        args,
        "num_patches",
        "batch_size",
        "memory_size",
        "chunk_size",
        "patch_size",
        "feature_dim",
        "embed_dim",
        "encoder_batch_size",
        "threads",
    )
    if args.full_max < 0:
        raise ValueError(f"--full-max must be >= 0, got {args.full_max}")
    if args.timeout is not None and not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0, got {args.timeout}")
    if args.tile_cache_mb < 0:
        raise ValueError(f"--tile-cache-mb must be >= 0, got {args.tile_cache_mb}")
    if args.slide is not None:
        if not Path(args.slide).exists():
            raise FileNotFoundError(f"--slide {args.slide}: no such file")
        if args.input != "pixels":
            raise ValueError("--slide needs --input pixels")
        if args.num_patches is not None:
            raise ValueError("--num-patches and --slide exclude each other (N = tissue patches)")
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
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        plot_memory(records, out / "memory.png")
        log.info("wrote %s and %s", out / "results.jsonl", out / "memory.png")
    return 0


def cmd_bench_speed(args: argparse.Namespace) -> int:
    from ips.config import load_config, resolve_config_path

    _check_positive(args, "batch_size", "canvas", "repeats", "threads")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    config = load_config(resolve_config_path(args.config), args.overrides)
    device = _device(args.device)

    from ips.bench_speed import DEFAULT_VARIANTS, bench_speed, speed_table

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
        canvas=args.canvas,
        mnist=args.mnist,
        variants=args.variants or DEFAULT_VARIANTS,
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
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (out / "table.md").write_text(table)
        log.info("wrote %s and %s", out / "results.jsonl", out / "table.md")
    return 0


BENCH_COMMANDS = {"memory": cmd_bench_memory, "speed": cmd_bench_speed}

COMMANDS = {
    "train": cmd_train,
    "predict": cmd_predict,
    "eval": cmd_eval,
    "make-mnist": cmd_make_mnist,
    "demo": cmd_demo,
    "make-slide": cmd_make_slide,
    "bench": cmd_bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.version:
        from ips import __version__

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
    except USER_ERRORS as err:
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"ips: error: {message}", file=sys.stderr)
        return 2
