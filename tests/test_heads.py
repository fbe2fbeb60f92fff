from __future__ import annotations

import torch

from ips.config import TaskSpec
from ips.heads import TaskHeads, compute_loss, predictions, probabilities

TASKS = (
    TaskSpec("kind", "multiclass", 3),
    TaskSpec("tumour", "binary"),
    TaskSpec("present", "multilabel", 4),
)


def test_each_task_reads_its_own_token():
    heads = TaskHeads(TASKS, embed_dim=6)
    pooled = torch.randn(2, 3, 6)
    logits = heads(pooled)
    assert logits["kind"].shape == (2, 3) and logits["tumour"].shape == (2,)
    pooled2 = pooled.clone()
    pooled2[:, 1] += 1.0  # only the binary task's token changes
    logits2 = heads(pooled2)
    assert torch.equal(logits["kind"], logits2["kind"])
    assert not torch.equal(logits["tumour"], logits2["tumour"])


def test_total_loss_is_the_mean_of_task_losses_from_logits():
    logits = {
        "kind": torch.tensor([[2.0, 0.0, -1.0]]),
        "tumour": torch.tensor([0.5]),
        "present": torch.tensor([[1.0, -1.0, 0.0, 3.0]]),
    }
    targets = {
        "kind": torch.tensor([0]),
        "tumour": torch.tensor([1.0]),
        "present": torch.tensor([[1.0, 0.0, 1.0, 1.0]]),
    }
    total, per = compute_loss(logits, targets, TASKS)
    ce = -torch.log_softmax(logits["kind"], -1)[0, 0]
    bce = -torch.log(torch.sigmoid(torch.tensor(0.5)))
    p = torch.sigmoid(logits["present"][0])
    t = targets["present"][0]
    ml = -(t * p.log() + (1 - t) * (1 - p).log()).mean()
    assert torch.allclose(per["kind"], ce) and torch.allclose(per["tumour"], bce)
    assert torch.allclose(per["present"], ml)
    assert torch.allclose(total, (ce + bce + ml) / 3)


def test_probabilities_and_predictions():
    assert torch.allclose(
        probabilities(torch.tensor([[0.0, 0.0]]), TASKS[0]), torch.tensor([[0.5, 0.5]])
    )
    assert predictions(torch.tensor([[0.1, 3.0, 0.2]]), TASKS[0]).tolist() == [1]
    assert predictions(torch.tensor([-0.1, 0.3]), TASKS[1]).tolist() == [0, 1]
