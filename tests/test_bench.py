"""The memory and extraction benchmarks (`ips bench memory`, `ips bench extract`) and
`ips make-slide`."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from ips.bench import (
    MEMORY_KEYS,
    FeatureFile,
    MemoryCase,
    bench_memory,
    max_rss_mb,
    measure_memory,
    peak_rss_since_reset_mb,
    reset_peak_rss,
    rss_mb,
    run_memory_case,
    write_features,
)
from ips.cli import main
from ips.model import IPSModel
from ips.sources import open_source, write_synthetic_slide

TINY_BENCH = dict(batch_size=2, memory_size=4, chunk_size=8, embed_dim=16, threads=1)


def _check_record(record: dict, **expected) -> None:
    assert record["status"] == "ok", record["status"]
    assert set(MEMORY_KEYS) <= set(record)
    for key, value in expected.items():
        assert record[key] == value, key
    assert record["peak_rss_mb"] > 0 and record["baseline_rss_mb"] > 0
    assert record["peak_rss_mb"] >= record["peak_rss_above_baseline_mb"] >= 0
    assert record["seconds"] > 0
    assert record["torch"] == torch.__version__ and record["device"] == "cpu"


def test_resident_memory_now_lies_under_the_high_water_mark():
    now = rss_mb()
    assert now > 50  # MiB: torch alone takes more
    assert now <= max_rss_mb() + 4  # the kernel counts pages in per-CPU batches: a little slack
    assert max_rss_mb(children=True) >= max_rss_mb()


def test_the_peak_since_a_reset_counts_memory_touched_after_it():
    if not reset_peak_rss():
        pytest.skip("the resident high-water mark cannot be reset here (not Linux)")
    before = rss_mb()
    block = np.ones(2**26, dtype=np.uint8)  # 64 MiB, above glibc's mmap threshold: fresh pages
    del block
    assert peak_rss_since_reset_mb() - before >= 48


def test_importing_the_package_leaves_the_speed_benchmark_unimported():
    """Every memory measurement imports `ips.bench` in a fresh process; the speed module (and
    `ips.train` under it) would raise that process's whole peak."""
    code = "import sys, ips.bench; print('ips.bench.speed' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_every_public_name_of_the_package_resolves():
    import ips.bench

    missing = [name for name in ips.bench.__all__ if not hasattr(ips.bench, name)]
    assert not missing
    assert set(ips.bench.__all__) <= set(dir(ips.bench))


def test_feature_file_reads_rows_in_the_asked_order_and_pickles(tmp_path):
    path = write_features(tmp_path / "f.npy", num_patches=50, feature_dim=3, seed=1)
    expected = np.load(path)
    rows = FeatureFile(path)
    ids = np.array([7, 3, 4, 5, 49, 0, 4])
    assert len(rows) == 50
    assert np.array_equal(rows.read(ids), expected[ids])
    assert np.array_equal(pickle.loads(pickle.dumps(rows)).read(ids[:3]), expected[ids[:3]])
    with pytest.raises(IndexError, match="50"):
        rows.read([50])


@pytest.mark.slow
def test_memory_benchmark_runs_each_method_in_a_fresh_process_up_to_the_full_cap():
    records = bench_memory(
        input="features", num_patches=[40, 20], feature_dim=8, full_max=20, **TINY_BENCH
    )
    assert [(r["method"], r["num_patches"]) for r in records] == [
        ("ips", 20),
        ("full", 20),
        ("ips", 40),
    ]
    for r in records:
        _check_record(r, input="features", batch_size=2, feature_dim=8)
    assert (records[0]["memory_size"], records[0]["chunk_size"]) == (4, 8)
    assert (records[1]["memory_size"], records[1]["chunk_size"]) == (20, 20)  # M >= N: no selection


@pytest.mark.parametrize("checkpointing", [False, True])
def test_one_training_step_over_a_generated_slide_is_measured(tmp_path, monkeypatch, checkpointing):
    slide = write_synthetic_slide(tmp_path / "s.tif", width=160, height=96, tile_size=16)
    case = MemoryCase(
        method="ips",
        input="pixels",
        path=str(slide.path),
        num_patches=50,  # of the 10 x 6 grid of 16-pixel patches, the first 50
        patch_size=16,
        encoder="small_cnn",
        activation_checkpointing=checkpointing,
        **TINY_BENCH,
    )
    asked = []
    original = IPSModel.set_grad_checkpointing

    def spy(model, enable=True):
        asked.append((model.model_config.encoder, enable))
        original(model, enable)

    monkeypatch.setattr(IPSModel, "set_grad_checkpointing", spy)
    threads = torch.get_num_threads()
    try:  # in this process, for speed; the case sets the thread count
        record = run_memory_case(case)
    finally:
        torch.set_num_threads(threads)
    assert asked == [("small_cnn", checkpointing)]
    _check_record(
        record,
        input="pixels",
        num_patches=50,
        patch_size=16,
        encoder="small_cnn",
        activation_checkpointing=checkpointing,
    )


def test_a_measurement_past_its_timeout_is_reported_not_raised(tmp_path):
    case = MemoryCase(method="ips", input="features", path=str(tmp_path / "f.npy"), num_patches=9)
    record = measure_memory(case, timeout=0.01)
    assert record["status"].startswith("timeout") and record["peak_rss_mb"] is None


@pytest.mark.slow
def test_bench_memory_command_prints_json_lines_and_writes_results_and_a_plot(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        ["bench", "memory", "--input", "features", "--num-patches", "30", "--methods", "ips"]
        + ["--batch-size", "1", "--memory-size", "4", "--chunk-size", "8", "--feature-dim", "8"]
        + ["--embed-dim", "16", "--threads", "1", "--json", "--out", str(out), "-q"]
    )
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    _check_record(record, method="ips", input="features", num_patches=30, batch_size=1)
    assert (out / "results.jsonl").read_text().strip() == lines[0]
    assert (out / "memory.png").read_bytes()[:4] == b"\x89PNG"


def test_make_slide_writes_a_slide_that_open_source_reads(tmp_path):
    path = tmp_path / "new" / "slide.tif"
    args = ["--width", "600", "--height", "400", "--tile", "128", "--mpp", "0.25"]
    assert main(["make-slide", "--out", str(path), *args, "--lesions", "2", "-q"]) == 0
    source = open_source(path, patch_size=100)
    assert source.level0_size == (600, 400) and len(source) == 24
    assert source.mpp == pytest.approx(0.25)
    assert source.read_region((0, 0), (600, 400)).min() < 200  # tissue is drawn

    blank = tmp_path / "blank.tif"
    assert main(["make-slide", "--out", str(blank), *args, "--blank", "-q"]) == 0
    assert open_source(blank, patch_size=100).read_region((0, 0), (600, 400)).min() == 255


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["make-slide", "--width", "0", "--height", "8"], "--width"),
        (["make-slide", "--width", "64", "--height", "64", "--tile", "100"], "--tile"),
        (["make-slide", "--width", "64", "--height", "64", "--mpp", "0"], "--mpp"),
        (["make-slide", "--width", "64", "--height", "64", "--blank", "--lesions", "1"], "--blank"),
        (["bench", "memory", "--memory-size", "0"], "--memory-size"),
        (["bench", "memory", "--num-patches", "10", "-5"], "--num-patches"),
        (["bench", "memory", "--full-max", "-1"], "--full-max"),
        (["bench", "memory", "--slide", "no/such/slide.tif"], "--slide"),
        (["bench", "memory", "--slide", __file__, "--input", "features"], "--slide"),
        (["bench", "memory", "--input", "pixels", "--encoder", "no_such_net"], "--encoder"),
        (["bench", "extract", "--slide", "no/such/slide.svs"], "--slide"),
        (["bench", "extract", "--size", "64", "64", "--patch-size", "128"], "--size"),
        (["bench", "extract", "--size", "64", "64", "--patch-size", "0"], "--patch-size"),
    ],
)
def test_bad_arguments_exit_2_with_one_line_naming_the_option(tmp_path, capsys, argv, option):
    if argv[0] == "make-slide":
        argv = [*argv, "--out", str(tmp_path / "s.tif")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ips: error:") and option in err[0]
    assert not (tmp_path / "s.tif").exists()


def test_bench_without_a_measurement_prints_help_and_exits_2(capsys):
    assert main(["bench"]) == 2
    assert "memory" in capsys.readouterr().out


def test_bench_extract_measures_both_floors_and_the_pipeline_on_a_slide(tmp_path, capsys):
    slide = write_synthetic_slide(tmp_path / "s.tif", width=128, height=96, tile_size=32)
    tiles = len(open_source(slide.path, patch_size=32, tissue="otsu"))
    out = tmp_path / "out"
    argv = ["bench", "extract", "--slide", str(slide.path), "--encoder", "resnet18_2blocks"]
    argv += ["--patch-size", "32", "--batch-sizes", "2", "4", "--workers", "0", "1"]
    assert main([*argv, "--threads", "1", "--json", "--out", str(out), "-q"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert (out / "results.jsonl").read_text().splitlines() == [json.dumps(r) for r in records]
    by = {(r["measure"], r.get("batch_size"), r.get("workers")): r for r in records}
    assert {k for k in by if k[0] == "encode"} == {("encode", 2, None), ("encode", 4, None)}
    summary = by[("summary", None, None)]
    best = summary["best_batch_size"]
    assert {k for k in by if k[0] != "encode"} == {
        ("decode", best, 0),
        ("decode", best, 1),
        ("pipeline", best, 0),
        ("pipeline", best, 1),
        ("summary", None, None),
    }
    for r in records:
        assert r["tiles"] == tiles > 0
        if r["measure"] in ("decode", "pipeline"):  # every tile of the slide
            assert r["timed_tiles"] == tiles
            assert r["tiles_per_second"] == pytest.approx(tiles / r["seconds"], rel=0.05)
    encode = max(by[("encode", b, None)]["tiles_per_second"] for b in (2, 4))
    assert by[("encode", best, None)]["tiles_per_second"] == encode
    decode = max(by[("decode", best, w)]["tiles_per_second"] for w in (0, 1))
    pipeline = by[("pipeline", best, summary["best_workers"])]["tiles_per_second"]
    assert summary["pipeline_over_floor"] == pytest.approx(pipeline / min(encode, decode), 0.01)
    assert "pipeline / min(decode, encode)" in (out / "table.md").read_text()
