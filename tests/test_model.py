from __future__ import annotations

import pickle

import pytest
import torch

import ips
from conftest import random_patches, random_targets
from ips.heads import compute_loss


def _model(tiny, **kw):
    torch.manual_seed(0)
    return ips.create_model(**{**tiny, "memory_size": 5, "chunk_size": 4, **kw})


def test_forward_returns_logits_per_task_and_selection(tiny):
    model = _model(tiny)
    out = model(random_patches(2, 30))
    assert out.logits["digit"].shape == (2, 3)
    assert out.logits["tumour"].shape == (2,)
    assert out.logits["labels"].shape == (2, 4)
    assert out.attention.shape == (2, 3, 5)  # (B, T, M)
    assert out.selected.shape == out.scores.shape == out.mask.shape == (2, 5)
    assert torch.allclose(out.attention.sum(-1), torch.ones(2, 3))


def test_a_training_step_changes_every_trainable_parameter(tiny):
    model = _model(tiny, dropout=0.1)
    model.train()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(random_patches(4, 20))
    loss, _ = compute_loss(out.logits, random_targets(4), model.tasks)
    loss.backward()
    no_grad = [k for k, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not no_grad, f"no gradient reached {no_grad}"
    optimizer.step()
    unchanged = [k for k, p in model.named_parameters() if torch.equal(p, before[k])]
    assert not unchanged


def test_same_seed_gives_the_same_selection_and_loss(tiny):
    losses, selected = [], []
    for _ in range(2):
        model = _model(tiny)
        torch.manual_seed(1)
        out = model(random_patches(2, 30), generator=torch.Generator().manual_seed(7))
        losses.append(compute_loss(out.logits, random_targets(2), model.tasks)[0])
        selected.append(out.selected)
    assert torch.equal(selected[0], selected[1])
    assert torch.equal(losses[0], losses[1])


def test_padded_and_unpadded_inputs_give_identical_logits(tiny):
    model = _model(tiny, shuffle=False).eval()
    long, short = random_patches(1, 30, seed=1), random_patches(1, 17, seed=2)
    padded = torch.cat(
        [long, torch.cat([short, torch.full((1, 13, 1, 8, 8), 255, dtype=torch.uint8)], 1)]
    )
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 17:] = False
    with torch.no_grad():
        batch = model(padded, mask)
        alone = [model(long), model(short)]
        as_list = model([long[0], short[0].numpy()])
    for name in batch.logits:
        for b in range(2):
            assert torch.allclose(batch.logits[name][b], alone[b].logits[name][0], atol=1e-5)
            assert torch.allclose(as_list.logits[name][b], alone[b].logits[name][0], atol=1e-5)
    assert int(batch.selected[1].max()) < 17


def test_images_with_fewer_patches_than_memory_use_all_of_them(tiny):
    model = _model(tiny, memory_size=50).eval()
    patches = random_patches(1, 12)
    out = model(patches)
    assert sorted(out.selected[0].tolist()) == list(range(12))
    mask = torch.ones(1, 12, dtype=torch.bool)
    with torch.no_grad():
        padded = model(
            torch.cat([patches, torch.zeros(1, 4, 1, 8, 8, dtype=torch.uint8)], 1),
            torch.cat([mask, torch.zeros(1, 4, dtype=torch.bool)], 1),
        )
        plain = model(patches)
    assert torch.allclose(padded.logits["digit"], plain.logits["digit"], atol=1e-5)
    assert padded.mask.sum() == 12


def test_wrong_patch_shape_is_named(tiny):
    model = _model(tiny)
    with pytest.raises(ValueError, match=r"patches must be \(n, C=1, P, P\)"):
        model(torch.zeros(1, 10, 3, 8, 8, dtype=torch.uint8))


@pytest.mark.parametrize("pos_enc", ["1d", "2d"])
def test_positional_encodings_change_the_output(tiny, pos_enc):
    patches = random_patches(1, 16)
    outs = []
    for kind in ("none", pos_enc):
        model = _model(tiny, pos_enc=kind, memory_size=20).eval()
        with torch.no_grad():
            outs.append(model(patches, grid_shape=(4, 4)).logits["digit"])
    assert not torch.allclose(outs[0], outs[1])


def test_2d_positional_encoding_needs_a_grid(tiny):
    model = _model(tiny, pos_enc="2d", memory_size=20)
    with pytest.raises(ValueError, match="grid"):
        model(random_patches(1, 16))


def test_feature_model_runs_on_precomputed_features(tiny):
    model = _model(tiny, encoder="features", feature_dim=12, memory_size=4, chunk_size=3)
    out = model(torch.randn(2, 20, 12))
    assert out.logits["digit"].shape == (2, 3)
    with pytest.raises(ValueError, match="F=12"):
        model(torch.randn(2, 20, 7))


def test_checkpoint_round_trip_gives_identical_outputs(tiny, tmp_path):
    model = _model(tiny).eval()
    path = ips.save_checkpoint(tmp_path / "model.pt", model, model.config, epoch=3)
    loaded = ips.load_model(path).eval()
    assert loaded.config == model.config
    patches = random_patches(2, 30)
    with torch.no_grad():
        a = model(patches, generator=torch.Generator().manual_seed(1))
        b = loaded(patches, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.selected, b.selected)
    for name in a.logits:
        assert torch.equal(a.logits[name], b.logits[name])
    assert ips.load_checkpoint(path)["epoch"] == 3


def test_a_failed_checkpoint_write_leaves_the_previous_file_intact(tiny, tmp_path, monkeypatch):
    model = _model(tiny)
    path = ips.save_checkpoint(tmp_path / "last.pt", model, model.config, epoch=1)
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ips.save_checkpoint(path, model, model.config, epoch=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class _RunsCode:
    def __reduce__(self):
        return (exec, ("open('pwned', 'w').write('x')",))


def test_a_checkpoint_crafted_to_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"format": "ips-checkpoint", "payload": _RunsCode()}))
    with pytest.raises(ValueError, match="evil.pt"):
        ips.load_model(path)
    assert not (tmp_path / "pwned").exists()


def test_loading_a_checkpoint_with_mismatched_weights_names_the_file(tiny, tmp_path):
    model = _model(tiny)
    payload = ips.load_checkpoint(ips.save_checkpoint(tmp_path / "a.pt", model, model.config))
    payload["config"]["model"]["embed_dim"] = 32
    torch.save(payload, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="b.pt"):
        ips.load_model(tmp_path / "b.pt")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        ips.load_model(tmp_path / "nope.pt")


def test_eval_forward_in_micro_batches_with_copies_encoded_once_equals_one_call(tiny, monkeypatch):
    patches = random_patches(2, 30)
    patches[:, ::2] = 0  # half the patches are the same blank patch
    calls = []
    outputs = []
    for options in (dict(dedup=False, encoder_batch_size=1000), dict(encoder_batch_size=3)):
        model = _model(tiny, memory_size=10, **options).eval()
        original = model.encoder.forward
        monkeypatch.setattr(
            model.encoder, "forward", lambda x, f=original: calls.append(len(x)) or f(x)
        )
        calls.clear()
        with torch.inference_mode():
            outputs.append(model(patches, generator=torch.Generator().manual_seed(0)))
        sizes = list(calls)
    assert max(sizes) <= 3  # micro-batches of 3, also for the kept patches
    assert torch.equal(outputs[0].selected, outputs[1].selected)
    for name in outputs[0].logits:
        torch.testing.assert_close(outputs[0].logits[name], outputs[1].logits[name])


def test_training_forward_encodes_the_kept_patches_in_one_call(tiny, monkeypatch):
    model = _model(tiny, memory_size=10, encoder_batch_size=3).train()
    calls = []
    original = model.encoder.forward
    monkeypatch.setattr(model.encoder, "forward", lambda x: calls.append(len(x)) or original(x))
    model(random_patches(2, 30), generator=torch.Generator().manual_seed(0))
    assert calls[-1] == 2 * 10  # BatchNorm statistics over the B x M kept patches together


def test_under_bf16_autocast_positions_score_identical_patches_as_in_float32(tiny):
    # copies of one patch differ only by their positional encoding; added to the bf16
    # embeddings in bf16 it is rounded (~0.2 % of the score spread here, enough to reorder
    # near-equal scores); added in float32 the spread matches float32 to ~1e-6
    model = _model(
        tiny, pos_enc="1d", embed_dim=64, head_dim=32, memory_size=8, chunk_size=24, distinct=False
    )  # every copy stays in the memory, so every copy is scored in every round
    patches = random_patches(1, 1).expand(1, 100, -1, -1, -1)

    def scores(amp: bool) -> list[torch.Tensor]:
        seen = []
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            model.select(
                patches,
                generator=torch.Generator().manual_seed(0),
                observe=lambda ids, s, valid: seen.append(s[0]),
            )
        return seen

    for fp32, bf16 in zip(scores(False), scores(True), strict=True):
        assert (bf16 - fp32).abs().max() <= 1e-4 * (fp32.max() - fp32.min())


def test_a_frozen_encoder_trains_only_its_projection_pooling_and_heads(tiny):
    model = _model({**tiny, "encoder": "small_cnn", "embed_dim": 16}, freeze_encoder=True)
    model.train()
    assert not model.encoder.training and model.pool.training  # the trunk stays in eval mode
    trunk = {k: v.clone() for k, v in model.encoder.state_dict().items() if "proj" not in k}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out = model(random_patches(4, 20))
    compute_loss(out.logits, random_targets(4), model.tasks)[0].backward()
    optimizer.step()
    after = model.encoder.state_dict()
    assert all(torch.equal(after[k], v) for k, v in trunk.items())  # weights and BN statistics
    assert model.encoder.proj.weight.grad is not None and model.pool.queries.grad is not None
    frozen = [k for k, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(k.startswith("encoder.") and ".proj." not in k for k in frozen)


def test_a_frozen_features_encoder_is_refused(tiny):
    with pytest.raises(ValueError, match="model.freeze_encoder"):
        ips.create_model(
            encoder="features",
            feature_dim=8,
            freeze_encoder=True,
            **{k: v for k, v in tiny.items() if k not in ("in_channels", "patch_size")},
        )


def test_augmentation_changes_only_the_patches_of_the_gradient_pass(tiny):
    model = _model(tiny)
    patches = random_patches(2, 30)
    generator = torch.Generator().manual_seed(3)
    plain = model.select(patches, generator=torch.Generator().manual_seed(3))
    seen = []

    def augment(raw):
        seen.append(raw.clone())
        return 255 - raw

    model.train()
    out = model(patches, generator=generator, augment=augment)
    assert torch.equal(out.selected, plain.ids)  # selection never saw the change
    (raw,) = seen
    assert raw.shape == (2 * 5, 1, 8, 8)  # only the B x M kept patches, once
    kept = torch.stack([patches[b, plain.ids[b]] for b in range(2)]).flatten(0, 1)
    assert torch.equal(raw, kept)


@pytest.mark.parametrize("kind", ["1d", "2d"])
def test_pos_scale_sets_the_amplitude_of_the_positional_encoding(tiny, kind):
    ids = torch.arange(12).reshape(1, 12)
    positions = torch.stack([ids // 4, ids % 4], dim=-1)  # (1, 12, 2) on a 3 x 4 grid
    unit = _model(tiny, pos_enc=kind).positional(ids, positions)
    scaled = _model(tiny, pos_enc=kind, pos_scale=0.25).positional(ids, positions)
    assert unit.abs().max() > 0.5  # sinusoids of amplitude 1
    torch.testing.assert_close(scaled, 0.25 * unit, rtol=0, atol=0)
