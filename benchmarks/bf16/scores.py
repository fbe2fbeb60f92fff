"""Score ties of the selection under bf16 autocast, with and without float32 scores.

For a model (freshly initialised with seed 0, or a checkpoint) and the first 240 validation
images of the Megapixel MNIST CPU configuration, selects the M patches of every image three
ways and compares them with the fp32 selection:

    fp32        everything in float32 (the reference)
    bf16        bf16 autocast, selection scores in float32 (what ips ships)
    bf16_raw    bf16 autocast, selection scores left in bf16 as autocast computes them

and counts, over every scored candidate set, how often the M-th and (M+1)-th best scores
are exactly equal (a tie at the boundary decides membership by visiting order, not content)
and how many distinct values the scores of a set take. Data: /tmp/mm.npz (see
`benchmarks/megapixel_mnist_cpu.md`).

    python benchmarks/bf16/scores.py [CHECKPOINT]
"""

import json
import sys

import torch

import ips
from ips.config import load_config
from ips.data import build_dataset
from ips.train import make_loader

torch.set_num_threads(2)
cfg = load_config("configs/megapixel_mnist_cpu.yaml", ["data.path=/tmp/mm.npz"])
if len(sys.argv) > 1:
    model = ips.load_model(sys.argv[1])
    name = sys.argv[1]
else:
    torch.manual_seed(0)
    model = ips.create_model(cfg)
    name = "init (seed 0)"
model.eval()
val = torch.utils.data.Subset(build_dataset(cfg, "val"), range(240))
M = model.selection_config.memory_size
pool = model.pool
guarded = pool.scores


def raw_scores(x, mask=None):  # the score computation without its float32 guard
    weights = pool.attn.weights(pool._queries(x.shape[0]), x, mask)
    return weights.mean(dim=1).mean(dim=1)


stats = {mode: {"sets": 0, "boundary_ties": 0, "distinct": 0.0, "overlap": 0.0}
         for mode in ("fp32", "bf16", "bf16_raw")}
images = 0
for batch in make_loader(val, cfg, shuffle=False, batch_size=16):
    patches = batch["patches"]
    chosen = {}
    for mode, s in stats.items():
        def observe(ids, scores, valid, s=s):
            for row, ok in zip(scores, valid, strict=True):
                v = row[ok].float().sort(descending=True).values
                if len(v) > M:
                    s["sets"] += 1
                    s["boundary_ties"] += int(v[M - 1] == v[M])
                    s["distinct"] += len(torch.unique(v)) / len(v)

        pool.scores = raw_scores if mode == "bf16_raw" else guarded
        amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32")
        with torch.inference_mode(), amp:
            sel = model.select(
                patches, batch["mask"], grid_shape=val.dataset.grid_shape,
                generator=torch.Generator().manual_seed(0), observe=observe,
            )
        chosen[mode] = sel.ids
    pool.scores = guarded
    for mode, s in stats.items():
        same = [len(set(a.tolist()) & set(b.tolist())) / M
                for a, b in zip(chosen[mode], chosen["fp32"], strict=True)]
        s["overlap"] += sum(same)
    images += len(patches)

for mode, s in stats.items():
    print(json.dumps({
        "model": name, "mode": mode, "images": images,
        "candidate_sets": s["sets"],
        "boundary_tie_rate": round(s["boundary_ties"] / max(s["sets"], 1), 3),
        "distinct_score_share": round(s["distinct"] / max(s["sets"], 1), 3),
        "overlap_with_fp32": round(s["overlap"] / images, 3),
    }))
