"""The speed benchmark (`ips bench speed`) and the speed options it compares."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import MNIST_TINY
from ips.bench import (
    SPEED_KEYS,
    VARIANTS,
    bench_speed,
    make_speed_batch,
    speed_table,
    training_step,
)
from ips.bench.feature_speed import write_feature_bags
from ips.cli import main
from ips.config import Config, load_config, replace_fields, resolve_config_path
from ips.data.feature_bags import H5FeatureBag, open_feature_bag
from ips.errors import InputError
from ips.model import create_model

TINY_SPEED = dict(
    encoder="resnet18_2blocks",
    in_channels=1,
    patch_size=16,
    embed_dim=16,
    num_heads=2,
    head_dim=8,
    mlp_dim=32,
    dropout=0.0,
    memory_size=6,
    chunk_size=10,
    tasks={"majority": {"kind": "multiclass", "num_classes": 10}, "flag": {"kind": "binary"}},
)
FP32_OPTIONS = [
    dict(dedup=False, channels_last=False),
    dict(dedup=False, channels_last=True),
    dict(dedup=True, channels_last=False),
    dict(dedup=True, channels_last=True),
    dict(dedup=True, channels_last=True, encoder_batch_size=3),
]


def _config(**overrides) -> Config:
    return replace_fields(Config(), **{**TINY_SPEED, **overrides})


@pytest.fixture(scope="module")
def mnist_batch():
    return make_speed_batch(_config(), input="mnist", batch_size=2, canvas=160, mnist=MNIST_TINY)


def _select(options: dict, batch, amp: str = "none"):
    torch.manual_seed(0)
    reference = create_model(_config())
    model = create_model(_config(**options))
    model.load_state_dict(reference.state_dict())
    dtype = torch.bfloat16 if amp == "bf16" else None
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        return model.select(
            batch.patches,
            grid_shape=batch.grid_shape,
            generator=torch.Generator().manual_seed(0),
        )


def test_mnist_batch_has_repeated_patches_and_dense_has_none(mnist_batch):
    B, N = mnist_batch.patches.shape[:2]
    assert (B, N) == (2, (160 // 16) ** 2)
    assert mnist_batch.patches.dtype == torch.uint8
    assert mnist_batch.distinct < B * N  # black canvas: one patch repeated many times
    assert set(mnist_batch.targets) == {"majority", "flag"}
    dense = make_speed_batch(_config(), input="dense", batch_size=2, canvas=64)
    assert dense.distinct == 2 * 16


@pytest.mark.parametrize("options", FP32_OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_every_fp32_speed_option_selects_exactly_the_same_patches(mnist_batch, options):
    plain = _select(dict(dedup=False, channels_last=False), mnist_batch)
    faster = _select(options, mnist_batch)
    assert torch.equal(faster.ids, plain.ids)
    torch.testing.assert_close(faster.scores, plain.scores, rtol=1e-4, atol=1e-5)


def test_bf16_selection_keeps_most_of_the_fp32_selection(mnist_batch):
    # stated tolerance: at least 80% of the kept patches agree with fp32 and the scores of the
    # patches both keep differ by at most 0.05 (bf16 has 8 bits of mantissa)
    fp32 = _select(dict(), mnist_batch)
    bf16 = _select(dict(), mnist_batch, amp="bf16")
    for b in range(len(fp32.ids)):
        a, c = fp32.ids[b].tolist(), bf16.ids[b].tolist()
        assert len(set(a) & set(c)) >= 0.8 * len(a)
        common = set(a) & set(c)
        for i in common:
            assert abs(fp32.scores[b, a.index(i)] - bf16.scores[b, c.index(i)]) <= 0.05


@pytest.mark.parametrize("variant", ["reference", "default", "micro_batch", "bf16"])
def test_every_variant_trains(mnist_batch, variant):
    options = {k: v for k, v in VARIANTS[variant].items() if k in ("dedup", "channels_last")}
    if VARIANTS[variant].get("encoder_batch_size"):
        options["encoder_batch_size"] = 4
    torch.manual_seed(0)
    model = create_model(_config(**options))
    before = {k: v.clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = training_step(model, optimizer, mnist_batch, amp=VARIANTS[variant].get("amp", "none"))
    assert torch.isfinite(torch.tensor(loss))
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert any(k.startswith("encoder.") for k in changed)
    assert any(k.startswith("pool.") for k in changed)


def _tiny_bench(variants: list[str], **options) -> list[dict]:
    """bench_speed on two small Megapixel MNIST images, one repeat, no warm-up."""
    return bench_speed(
        _config(),
        input="mnist",
        batch_size=2,
        canvas=160,
        mnist=MNIST_TINY,
        variants=variants,
        repeats=1,
        warmup=0,
        threads=1,
        **options,
    )


@pytest.mark.slow
def test_bench_speed_measures_floor_step_inference_and_baseline(mnist_batch):
    records = _tiny_bench(["reference", "default"])
    by = {(r["measure"], r["variant"]): r for r in records}
    assert set(by) == {
        ("floor", "fp32"),
        ("step", "reference"),
        ("infer", "reference"),
        ("step", "default"),
        ("infer", "default"),
        ("full", "default"),
        ("summary", "reference"),
        ("summary", "default"),
    }
    for record in records:
        assert set(SPEED_KEYS) <= set(record)
        assert record["num_patches"] == 100 and record["batch_size"] == 2
        assert record["torch"] == torch.__version__
    for key in [("floor", "fp32"), ("step", "default"), ("infer", "default"), ("full", "default")]:
        assert by[key]["seconds"] > 0
        assert by[key]["images_per_second"] == pytest.approx(2 / by[key]["seconds"], rel=1e-2)
    floor = by["floor", "fp32"]
    assert floor["seconds"] == pytest.approx(
        floor["no_grad_seconds"] + floor["grad_seconds"], abs=1e-3
    )
    assert floor["best_encoder_batch_size"] in {int(k) for k in floor["encoder_patches_per_second"]}
    assert by["step", "default"]["same_selection"] is True
    summary = by["summary", "default"]
    assert summary["step_over_floor"] == pytest.approx(
        by["step", "default"]["seconds"] / floor["seconds"], rel=1e-2
    )
    assert summary["full_over_step"] == pytest.approx(
        by["full", "default"]["seconds"] / by["step", "default"]["seconds"], rel=1e-2
    )
    assert by["summary", "reference"]["speedup_over_reference"] == 1.0
    step = by["step", "default"]
    assert 0 < step["select_seconds"] < step["seconds"] * 5
    assert len(step["paired_step_over_floor"]) == 1  # one pair per repeat
    ((floor_s, step_s),) = step["paired_seconds"]  # the pair's own runs give its ratio
    assert step["paired_step_over_floor"][0] == pytest.approx(step_s / floor_s, abs=2e-3)
    assert summary["paired_step_over_floor"] == step["paired_step_over_floor"][0] > 0
    assert by["summary", "reference"]["paired_step_over_floor"] is None  # default only
    table = speed_table(records)
    assert table.count("\n") == len(records) + 2 and "| step | default |" in table


def test_fp16_is_reported_skipped_on_a_cpu(mnist_batch):
    records = _tiny_bench(["default", "fp16"], full=False)
    by = {(r["measure"], r["variant"]): r for r in records}
    assert by["step", "fp16"]["seconds"] is None
    assert "skipped: fp16" in by["step", "fp16"]["status"]
    assert ("floor", "fp16") not in by and ("infer", "fp16") not in by
    assert by["step", "default"]["seconds"] > 0


def test_bench_speed_command_writes_json_lines_and_a_table(tmp_path, capsys):
    code = main(
        [
            "bench",
            "speed",
            "--config",
            "megapixel_mnist",
            "--set",
            "model.patch_size=16",
            "--set",
            "model.embed_dim=16",
            "--set",
            "model.num_heads=2",
            "--set",
            "selection.memory_size=4",
            "--set",
            "selection.chunk_size=4",
            "--input",
            "dense",
            "--canvas",
            "48",
            "--batch-size",
            "2",
            "--variants",
            "default",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--no-full",
            "--threads",
            "1",
            "--json",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["measure"], r["variant"]) for r in lines] == [
        ("floor", "fp32"),
        ("step", "default"),
        ("infer", "default"),
        ("summary", "default"),
    ]
    assert all(r["num_patches"] == 9 and r["input"] == "dense" for r in lines)
    saved = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert saved == lines
    assert "| summary | default |" in (tmp_path / "table.md").read_text()


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--variants", "fastest"], "variants"),
        (["--repeats", "0"], "--repeats"),
        (["--batch-size", "0"], "--batch-size"),
        (["--set", "selection.memory_size=0"], "memory_size"),
    ],
)
def test_bad_speed_arguments_exit_2_with_one_line_naming_the_option(capsys, argv, option):
    code = main(["bench", "speed", "--input", "dense", "--canvas", "48", *argv])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ips: error:") and option in err[0]


# ---- feature bags ----------------------------------------------------------------------------

TINY_BAGS = dict(memory_size=8, chunk_size=16, embed_dim=16, num_heads=2, head_dim=8, mlp_dim=32)
B, N, F, M = 2, 64, 32, 8


def test_feature_bags_are_written_in_the_extraction_layout_with_distinct_random_rows(tmp_path):
    paths = write_feature_bags(tmp_path, batch_size=B, num_patches=N, feature_dim=F, seed=3)
    rows = []
    for path in paths:
        bag = open_feature_bag(path)
        assert isinstance(bag, H5FeatureBag) and (len(bag), bag.feature_dim) == (N, F)
        assert bag.patch_size_level0 == 256 and bag.positions([9]).tolist() == [[1, 1]]
        assert bag.attrs["feature_dim"] == F
        rows.append(bag.read(np.arange(N)))
        bag.close()
    every = np.concatenate(rows)
    assert every.dtype == np.float32 and len(np.unique(every, axis=0)) == B * N
    again = write_feature_bags(
        tmp_path / "again", batch_size=1, num_patches=N, feature_dim=F, seed=3
    )
    with open_feature_bag(again[0]) as bag:  # seeded
        np.testing.assert_array_equal(bag.read(np.arange(N)), rows[0])


def test_the_features_input_measures_every_part_on_bags_read_lazily():
    config = replace_fields(load_config(resolve_config_path("camelyon16")), **TINY_BAGS)
    records = bench_speed(
        config,
        input="features",
        batch_size=B,
        num_patches=N,
        feature_dim=F,
        variants=["reference", "default"],
        repeats=1,
        warmup=0,
        threads=1,
    )
    by = {(r["measure"], r["variant"]): r for r in records}
    assert set(by) == {
        ("floor", "fp32"),
        *((m, v) for m in ("step", "infer", "summary") for v in ("reference", "default")),
        ("full", "default"),
    }
    row_bytes = F * 4
    for record in records:
        assert set(SPEED_KEYS) <= set(record)
        sizes = [record[k] for k in ("num_patches", "feature_dim", "batch_size", "memory_size")]
        assert sizes == [N, F, B, M]
        assert (record["chunk_size"], record["embed_dim"]) == (16, 16)
        assert record["input"] == "features" and record["loading"] == "eager_sequential"
        if record["measure"] != "summary":
            assert record["seconds"] > 0 and record["peak_rss_mb"] > 0
    floor = by["floor", "fp32"]
    assert floor["bytes_read"] == B * N * row_bytes  # every row once
    parts = floor["read_seconds"] + floor["no_grad_seconds"] + floor["grad_seconds"]
    assert floor["seconds"] == pytest.approx(parts, abs=1e-3)
    for variant in ("reference", "default"):
        for measure in ("step", "infer"):
            record = by[measure, variant]
            assert record["same_selection"] is True
            assert record["bytes_read"] == B * (N + M) * row_bytes  # selection + the kept rows
            assert 0 < record["read_seconds"]
    assert by["full", "default"]["bytes_read"] == B * N * row_bytes
    assert by["summary", "default"]["paired_step_over_floor"] > 0
    assert "| floor | fp32 |" in speed_table(records)


def test_the_features_input_needs_the_features_encoder():
    with pytest.raises(InputError, match="model.encoder .features."):
        bench_speed(_config(), input="features", batch_size=1, num_patches=4, feature_dim=4)


def test_bench_speed_command_measures_feature_bags_as_json_lines(capsys):
    sets = [f"selection.{k}={v}" for k, v in TINY_BAGS.items() if k.endswith("_size")]
    sets += [f"model.{k}={v}" for k, v in TINY_BAGS.items() if not k.endswith("_size")]
    argv = ["bench", "speed", "--input", "features", "--num-patches", str(N)]
    argv += ["--feature-dim", str(F), "--batch-size", str(B), "--variants", "default"]
    argv += ["--repeats", "1", "--warmup", "0", "--no-full", "--threads", "1", "--json"]
    assert main([*argv, *(a for s in sets for a in ("--set", s))]) == 0  # camelyon16 config
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["measure"], r["variant"]) for r in lines] == [
        ("floor", "fp32"),
        ("step", "default"),
        ("infer", "default"),
        ("summary", "default"),
    ]
    assert all((r["num_patches"], r["feature_dim"], r["batch_size"]) == (N, F, B) for r in lines)
    assert lines[-2]["same_selection"] is True and lines[-2]["bytes_read"] > 0


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--input", "dense", "--num-patches", "10"], "--num-patches"),
        (["--input", "features", "--canvas", "48"], "--canvas"),
        (["--input", "features", "--feature-dim", "0"], "--feature-dim"),
        (["--input", "features", "--config", "megapixel_mnist"], "model.encoder"),
    ],
)
def test_bad_feature_speed_arguments_exit_2_naming_the_option(capsys, argv, option):
    code = main(["bench", "speed", *argv])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ips: error:") and option in err[0]
