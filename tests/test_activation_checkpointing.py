"""train.activation_checkpointing: the encoder's activations of the gradient pass are
recomputed in backward, and the step is exactly the step without it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ips
import ips.encoders
from conftest import MNIST_TINY, TINY, random_patches, random_targets
from ips.cli import main
from ips.config import load_config
from ips.data import generate_megapixel_mnist, load_mnist
from ips.encoders import checkpoint_stages
from ips.errors import ConfigError, InputError
from ips.heads import compute_loss
from ips.model import load_checkpoint
from ips.train import fit

# float32 on a CPU: the recomputation repeats the forward's kernels on the same inputs, and
# backward then runs the same kernels as without checkpointing, so results are bitwise equal


def _step(encoder: str, checkpointing: bool, **overrides):
    """One training step of a tiny model (P = 32, M = 4, B = 2): loss, gradients, state dict,
    bytes saved for backward, and how often the encoder's first layer ran."""
    torch.manual_seed(0)
    model = ips.create_model(
        **{**TINY, "encoder": encoder, "patch_size": 32, "memory_size": 4, "chunk_size": 4},
        **overrides,
    )
    model.set_grad_checkpointing(checkpointing)
    model.train()
    first = next(m for m in model.encoder.modules() if isinstance(m, nn.Conv2d | nn.Linear))
    calls = []
    first.register_forward_hook(lambda *_: calls.append(1))
    saved: dict[int, int] = {}  # storage -> bytes of every tensor kept for backward

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(random_patches(2, 12, p=32), generator=torch.Generator().manual_seed(2))
    loss, _ = compute_loss(out.logits, random_targets(2), model.tasks)
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, model.state_dict(), sum(saved.values()), len(calls)


@pytest.mark.parametrize("encoder", ["small_cnn", "resnet18_2blocks"])
def test_checkpointing_gives_the_same_loss_gradients_and_batchnorm_statistics(encoder):
    loss, grads, state, _, calls = _step(encoder, False)
    loss_ck, grads_ck, state_ck, _, calls_ck = _step(encoder, True)
    assert calls_ck == calls + 1  # the gradient pass's encoder forward ran again in backward
    assert torch.equal(loss_ck, loss)
    assert grads_ck.keys() == grads.keys()
    assert all(torch.equal(grads_ck[k], grads[k]) for k in grads)
    assert all(torch.equal(state_ck[k], state[k]) for k in state)  # weights and BN buffers
    counts = [v for k, v in state_ck.items() if k.endswith("num_batches_tracked")]
    assert counts and all(int(c) == 1 for c in counts)  # one update each, not two


@pytest.mark.parametrize("encoder", ["small_cnn", "resnet18_2blocks"])
def test_checkpointing_keeps_a_fraction_of_the_activations_for_backward(encoder):
    kept = _step(encoder, False)[3]
    kept_ck = _step(encoder, True)[3]
    assert kept_ck < kept / 4  # only each stage's input (and the pooling's own) stays


def test_checkpointed_stages_replay_the_dropout_and_update_batchnorm_once():
    def stages() -> list[nn.Module]:
        torch.manual_seed(0)
        return [
            nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5)),
            nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)),
        ]

    x = torch.rand(6, 1, 10, 10)
    results = []
    for run in (lambda s, x: nn.Sequential(*s)(x), checkpoint_stages):
        modules = stages()
        torch.manual_seed(1)
        y = run(modules, x)
        y.square().sum().backward()
        grads = [p.grad for m in modules for p in m.parameters()]
        results.append((y.detach(), grads, [b.clone() for m in modules for b in m.buffers()]))
    (y, grads, buffers), (y_ck, grads_ck, buffers_ck) = results
    assert torch.equal(y_ck, y)
    assert all(torch.equal(a, b) for a, b in zip(grads_ck, grads, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(buffers_ck, buffers, strict=True))


def _tiny_timm(name: str, **overrides) -> nn.Module:
    pytest.importorskip("timm")
    from ips.encoders import build_timm, generic_timm_preset

    torch.manual_seed(0)
    return build_timm(generic_timm_preset(name), name=name, out_dim=8, **overrides)


def test_a_timm_vit_with_dropout_checkpoints_its_blocks_exactly():
    vit = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
    drop = dict(drop_rate=0.3, proj_drop_rate=0.3, attn_drop_rate=0.3, drop_path_rate=0.3)
    x = torch.rand(6, 3, 32, 32)
    results = []
    for checkpointing in (False, True):
        encoder = _tiny_timm("timm:vit_tiny_patch16_224", **vit, **drop).train()
        encoder.set_grad_checkpointing(checkpointing)
        torch.manual_seed(1)
        y = encoder(x)
        y.square().sum().backward()
        results.append((y.detach(), {k: p.grad for k, p in encoder.named_parameters()}))
    (y, grads), (y_ck, grads_ck) = results
    assert encoder.trunk.grad_checkpointing
    assert torch.equal(y_ck, y)
    assert all(torch.equal(grads_ck[k], grads[k]) for k in grads)


def test_a_timm_model_with_batchnorm_is_refused_naming_the_setting():
    encoder = _tiny_timm("timm:resnet18")
    with pytest.raises(InputError, match="train.activation_checkpointing: .*BatchNorm"):
        encoder.set_grad_checkpointing(True)


def test_a_frozen_encoder_trains_with_checkpointing_as_without():
    loss, grads, state, _, calls = _step("small_cnn", False, freeze_encoder=True)
    loss_ck, grads_ck, state_ck, _, calls_ck = _step("small_cnn", True, freeze_encoder=True)
    assert calls_ck == calls  # nothing to recompute: no activations are kept for the trunk
    assert torch.equal(loss_ck, loss) and all(torch.equal(grads_ck[k], grads[k]) for k in grads)
    assert all(torch.equal(state_ck[k], state[k]) for k in state)


def test_the_features_encoder_trains_with_checkpointing_as_without():
    tiny = {k: v for k, v in TINY.items() if k not in ("in_channels", "patch_size")}
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = ips.create_model(
            **tiny, encoder="features", feature_dim=6, memory_size=4, chunk_size=4
        )
        model.set_grad_checkpointing(checkpointing)
        model.train()
        features = torch.randn(2, 12, 6, generator=torch.Generator().manual_seed(1))
        out = model(features, generator=torch.Generator().manual_seed(2))
        loss, _ = compute_loss(out.logits, random_targets(2), model.tasks)
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters()}))
    (loss, grads), (loss_ck, grads_ck) = results
    assert torch.equal(loss_ck, loss) and all(torch.equal(grads_ck[k], grads[k]) for k in grads)


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "mm.npz"
    return generate_megapixel_mnist(
        path, load_mnist(MNIST_TINY), num_train=16, num_test=8, canvas_size=(150, 150), num_noise=2
    )


def test_a_one_epoch_run_with_checkpointing_writes_the_same_weights(
    tiny_mnist, tmp_path, monkeypatch
):
    sets = [
        *("model.embed_dim=16", "model.num_heads=2", "model.head_dim=8", "model.mlp_dim=32"),
        *("model.patch_size=30", "selection.memory_size=4", "selection.chunk_size=8"),
        *("train.epochs=1", "train.batch_size=8", "train.amp=none", "data.val_fraction=0.25"),
        f"data.path={tiny_mnist}",
    ]
    checkpoint = ips.encoders.checkpoint
    calls = {"plain": 0, "checkpointed": 0}
    for name, value in (("plain", "false"), ("checkpointed", "true")):

        def counted(*args, name=name, **kwargs):
            calls[name] += 1
            return checkpoint(*args, **kwargs)

        monkeypatch.setattr(ips.encoders, "checkpoint", counted)
        config = load_config(
            "configs/megapixel_mnist_cpu.yaml", [*sets, f"train.activation_checkpointing={value}"]
        )
        fit(config, tmp_path / name, progress=False)
    assert calls["plain"] == 0 and calls["checkpointed"] > 0  # the setting reached the encoder
    plain = load_checkpoint(tmp_path / "plain" / "last.pt")["model"]
    checkpointed = load_checkpoint(tmp_path / "checkpointed" / "last.pt")["model"]
    assert plain.keys() == checkpointed.keys()
    assert all(torch.equal(checkpointed[k], plain[k]) for k in plain)


def test_a_setting_that_is_not_a_boolean_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.activation_checkpointing=3"])
    assert str(err.value) == "train.activation_checkpointing: expected a boolean, got 3"
    monkeypatch.chdir(tmp_path)
    args = ["train", "--config", "megapixel_mnist_cpu", "--out", "x"]
    assert main([*args, "--set", "train.activation_checkpointing=3"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ips: error: ")
    assert lines[0].endswith("megapixel_mnist_cpu.yaml: " + str(err.value))
