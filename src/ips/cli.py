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

    p = sub.add_parser("demo", help="generate data, train on the CPU, evaluate, draw pictures")
    p.add_argument("--out", default="runs/demo", help="demo folder")
    p.add_argument("--mnist", help="MNIST idx folder or .npz (see make-mnist)")
    p.add_argument("--json", action="store_true", help="last line: test metrics as JSON")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
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


def cmd_demo(args: argparse.Namespace) -> int:
    from ips.demo import run_demo

    result = run_demo(
        args.out, mnist=args.mnist, device=_device(args.device), progress=not args.no_progress
    )
    if args.json:
        print(json.dumps({"test": result["test"], "run_dir": result["run_dir"]}))
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "make-mnist": cmd_make_mnist, "demo": cmd_demo}


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
