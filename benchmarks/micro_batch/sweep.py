"""Encoder throughput without gradients against the patches per call, interleaved.

For each encoder, precision and batch size, encodes the same 1,024 patches (P = 50, uniform
random pixels, eval mode, channels-last, inference mode) in calls of that size; every round
visits all batch sizes once, in a rotated order, so a slow spell of a shared machine falls on
all of them alike; prints the median patches/s over the rounds as JSON lines.

    python benchmarks/micro_batch/sweep.py [ROUNDS]
"""

import json
import statistics
import sys
import time

import torch

from ips.encoders import create_encoder

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
torch.set_num_threads(2)
sizes = (16, 32, 64, 128, 256, 1024)
x = torch.rand(1024, 1, 50, 50).contiguous(memory_format=torch.channels_last)
for name in ("resnet18_2blocks", "small_cnn"):
    encoder = create_encoder(name, in_channels=1, embed_dim=128)
    encoder = encoder.to(memory_format=torch.channels_last).eval()
    for amp in (False, True):
        rates = {s: [] for s in sizes}
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=amp):
            encoder(x[:64])  # warm-up
            for r in range(rounds):
                for s in sizes[r % len(sizes):] + sizes[: r % len(sizes)]:
                    start = time.perf_counter()
                    for i in range(0, len(x), s):
                        encoder(x[i : i + s])
                    rates[s].append(len(x) / (time.perf_counter() - start))
        print(json.dumps({
            "encoder": name,
            "precision": "bf16" if amp else "fp32",
            "patches_per_second": {s: round(statistics.median(v)) for s, v in rates.items()},
            "rounds": rounds,
        }))
