"""Tile encoders on the CPU: tiles/s in float32 and bf16 autocast, peak memory, and how far
bf16 embeddings are from float32 ones, per preset of ``ips.encoders``.

Usage (from the repository root, the .venv installed; each preset in a fresh process):

    .venv/bin/python benchmarks/encoders/bench.py --out benchmarks/encoders/results.jsonl

Weights are random (seeded; the published ones are gated or unreachable here), so the figures
are the architectures' speed and their bf16 error on random weights. LayerScale factors are
set to 1 first: at timm's initial 1e-5 the blocks barely change the tokens and bf16 would look
exact, where trained blocks contribute fully. Tiles: 224 x 224 RGB patches of the real Aperio
slide in ../shared/data (noise when it is missing).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SLIDE = Path(__file__).resolve().parents[3] / "shared" / "data" / "cmu_small_region.svs"


def tiles(count: int, side: int):
    import numpy as np
    import torch

    if SLIDE.exists():
        from ips.sources import open_source

        source = open_source(SLIDE, patch_size=side, tissue="otsu")
        ids = np.linspace(0, len(source) - 1, count).astype(int)
        return torch.from_numpy(source.read(ids))
    return torch.randint(0, 256, (count, 3, side, side), dtype=torch.uint8)


def measure(name: str, batches: list[int], seconds: float) -> dict:
    """One preset in this process: build, then time batches in float32 and bf16."""
    import torch

    from ips.encoders import PRESETS
    from ips.features import build_extractor
    from ips.precision import autocast
    from ips.rss import max_rss_mb

    torch.set_num_threads(2)
    torch.manual_seed(0)
    started = time.perf_counter()
    extractor = build_extractor(name, None, patch_size=224, seed=0)
    build_s = time.perf_counter() - started
    with torch.no_grad():  # blocks at full strength, as trained ones are
        for key, value in extractor.named_parameters():
            if key.endswith(("ls1.gamma", "ls2.gamma")):
                value.fill_(1.0)
    side = PRESETS[name].input_size or 224
    x = tiles(max(batches), 224)
    record = {"encoder": name, "width": extractor.feature_dim, "input": side}
    record["parameters_m"] = round(sum(p.numel() for p in extractor.parameters()) / 1e6, 1)
    record["build_s"] = round(build_s, 1)
    embeddings = {}
    for amp in ("none", "bf16"):
        rates = {}
        for batch in batches:
            with torch.inference_mode(), autocast(torch.device("cpu"), amp):
                extractor(x[:batch])  # warm-up
                done, began = 0, time.perf_counter()
                while time.perf_counter() - began < seconds or done == 0:
                    out = extractor(x[:batch])
                    done += batch
                rates[batch] = done / (time.perf_counter() - began)
            embeddings[amp] = out.float()
        best = max(rates, key=rates.get)
        record[f"{amp}_tiles_per_s"] = {str(b): round(r, 3) for b, r in rates.items()}
        record[f"{amp}_best_batch"] = best
    f32, b16 = embeddings["none"], embeddings["bf16"]
    n = min(len(f32), len(b16))
    cos = torch.nn.functional.cosine_similarity(f32[:n], b16[:n], dim=1)
    rel = (b16[:n] - f32[:n]).norm(dim=1) / f32[:n].norm(dim=1)
    record["bf16_cosine_min"] = round(float(cos.min()), 5)
    record["bf16_rel_l2_max"] = round(float(rel.max()), 5)
    record["peak_rss_mb"] = round(max_rss_mb(), 1)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="results.jsonl")
    parser.add_argument("--encoders", nargs="*", help="default: every preset")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed per batch size")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        from ips.encoders import PRESETS

        big = PRESETS[args.one].width >= 1536 or PRESETS[args.one].input_size == 448
        print(json.dumps(measure(args.one, [1, 4] if big else [1, 8, 32], args.seconds)))
        return
    from ips.encoders import PRESETS

    names = args.encoders or list(PRESETS)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        for name in names:
            command = [sys.executable, __file__, "--out", str(out), "--one", name]
            command += ["--seconds", str(args.seconds)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                record = {"encoder": name, "error": done.stderr.strip().splitlines()[-1:]}
            else:
                record = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(record), flush=True)
            fh.write(json.dumps(record) + "\n")
            fh.flush()


if __name__ == "__main__":
    main()
