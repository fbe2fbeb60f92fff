"""Selection collapse under bf16 autocast: selection scores in float32 against raw bf16.

Trains the Megapixel MNIST CPU configuration with bf16 autocast and `selection.distinct`
off (so copies of the blank background may fill the memory, as in the plain algorithm), for
the first EPOCHS epochs of its 10-epoch schedule, one torch thread, with the selection scores

    fp32    computed in float32 from the bf16 embeddings (what ips ships)
    raw     left as bf16 autocast computes them (softmax weights rounded to 8 bits)

and prints per epoch the share of kept patches that touch a digit and the validation
majority accuracy. Run the two side by side on two cores. Data: /tmp/mm.npz (see
`benchmarks/megapixel_mnist_cpu.md`).

    python benchmarks/bf16/collapse.py {fp32,raw} OUT [EPOCHS]
"""

import json
import sys

import torch

from ips.aggregation import CrossAttentionPool
from ips.config import load_config
from ips.train import fit

mode, out = sys.argv[1], sys.argv[2]
epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 4
torch.set_num_threads(1)
if mode == "raw":

    def raw_scores(self, x, mask=None):  # the score computation without its float32 guard
        weights = self.attn.weights(self._queries(x.shape[0]), x, mask)
        return weights.mean(dim=1).mean(dim=1)

    CrossAttentionPool.scores = raw_scores
elif mode != "fp32":
    raise SystemExit(f"mode must be fp32 or raw, got {mode!r}")
cfg = load_config(
    "configs/megapixel_mnist_cpu.yaml",
    ["data.path=/tmp/mm.npz", "train.amp=bf16", "selection.distinct=false"],
)
summary = fit(cfg, out, progress=False, max_epochs=epochs)
for row in summary["history"]:
    print(json.dumps({
        "mode": mode,
        "epoch": row["epoch"],
        "train_foreground_share": round(row["train_foreground_share"], 3),
        "val_foreground_share": round(row["val_foreground_share"], 3),
        "val_majority_accuracy": round(row["val_majority/accuracy"], 3),
        "train_loss": round(row["train_loss"], 3),
    }))
