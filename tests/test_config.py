from __future__ import annotations

from pathlib import Path

import pytest

from ips.config import (
    REFERENCE,
    Config,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    reference_departures,
    replace_fields,
    resolve_config_path,
)
from ips.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_round_trip_through_plain_data():
    config = Config()
    assert config_from_dict(config_to_dict(config)) == config


def test_yaml_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  embed_dim: 64\n  tasks:\n    tumour: {kind: binary}\n"
        "selection:\n  memory_size: 12\n"
    )
    config = load_config(path, ["train.lr=3e-4", "selection.chunk_size=7", "model.pos_enc=1d"])
    assert config.model.embed_dim == 64
    assert config.model.tasks[0].name == "tumour" and config.model.tasks[0].num_outputs == 1
    assert config.selection.memory_size == 12 and config.selection.chunk_size == 7
    assert config.train.lr == 3e-4 and config.model.pos_enc == "1d"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("model:\n  embed_dimm: 3\n", "model.embed_dimm"),
        ("selection:\n  memory_size: many\n", "selection.memory_size"),
        ("selection:\n  memory_size: 0\n", "selection.memory_size"),
        ("selection:\n  chunk_size: -2\n", "selection.chunk_size"),
        ("train:\n  lr: fast\n", "train.lr"),
        ("training:\n  lr: 1\n", "training"),
        ("model:\n  tasks: {a: {kind: regression}}\n", "tasks.a.kind"),
        ("model:\n  normalize_mean: [0.5, 0.5]\n", "model.normalize_mean"),
        ("model:\n  shuffle: true\n", "model.shuffle"),
        ("model:\n  encoder_grid: 0\n", "model.encoder_grid"),
        ("data:\n  val_fraction: 1.5\n", "data.val_fraction"),
    ],
)
def test_bad_keys_and_values_raise_naming_the_key(tmp_path, text, named):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=named.replace(".", r"\.")) as err:
        load_config(path)
    assert "bad.yaml" in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["lr"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_word_named_fields_are_replaced_and_checked():
    config = replace_fields(Config(), memory_size=5, embed_dim=32, num_heads=2)
    assert config.selection.memory_size == 5 and config.model.embed_dim == 32
    with pytest.raises(ValueError, match="model.embed_dim"):
        replace_fields(Config(), embed_dim="wide")
    with pytest.raises(ValueError, match="memory"):
        replace_fields(Config(), memory=5)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    load_config(path)


@pytest.mark.parametrize(
    ("text", "sets", "message"),
    [
        (
            "some_key: 3\n",
            [],
            "some_key: unknown section; expected one of model, selection, data, train",
        ),
        (
            "1: 2\n",
            [],
            "config: key 1 is not a section name; expected one of model, selection, data, train",
        ),
        ("model: 5\n", [], "model: expected a mapping of keys, got 5"),
        ("model: 5\n", ["model.x=1"], "override 'model.x=1': model is 5, not a mapping"),
        ("model:\n  1: 2\n", [], "model: key 1 is not a name (expected printable text)"),
        ("train:\n  lr: .nan\n", [], "train.lr: expected a finite number, got nan"),
        ("train:\n  lr: .inf\n", [], "train.lr: expected a finite number, got inf"),
        (
            "train:\n  grad_clip: .nan\n",
            [],
            "train.grad_clip: expected a finite number or null, got nan",
        ),
        (
            "model:\n  normalize_mean: [.nan]\n",
            [],
            "model.normalize_mean[0]: expected a finite number, got nan",
        ),
        (
            f"train:\n  epochs: {10**30}\n",
            [],
            f"train.epochs: expected an integer in [-2**63, 2**63), got {10**30}",
        ),
        (
            "data:\n  num_workers: 1000000000\n",
            [],
            "data.num_workers must be in [0, 1024] (one process each), got 1000000000",
        ),
        ("train:\n  seed: -1\n", [], "train.seed must be in [0, 2**32), got -1"),
        ("", ["train=3"], "override 'train=3': expected section.key=value, e.g. train.lr=3e-4"),
        (
            "",
            ["model..x=1"],
            "override 'model..x=1': expected section.key=value, e.g. train.lr=3e-4",
        ),
        ("", [".x=1"], "override '.x=1': expected section.key=value, e.g. train.lr=3e-4"),
        ("", ["="], "override '=': expected section.key=value, e.g. train.lr=3e-4"),
        (
            "",
            ["train.lr=["],
            "override 'train.lr=[': the value is not valid YAML (expected the node content, but "
            "found '<stream end>' at line 1, column 2)",
        ),
        (
            "",
            ["model.tasks=5"],
            "model.tasks: expected a mapping name -> {kind, num_classes}, got 5",
        ),
        (
            "model:\n  tasks: [1, 2]\n",
            [],
            "model.tasks[0]: expected a mapping with name, kind and num_classes, got 1",
        ),
        (
            "model:\n  tasks: {x: 5}\n",
            [],
            "model.tasks.x: expected a mapping with kind and num_classes, got 5",
        ),
        (
            "model:\n  tasks: {x: {kind: [1]}}\n",
            [],
            "model.tasks.x.kind: expected a string, got [1]",
        ),
        (
            "model:\n  tasks: {x: {num_classes: .nan}}\n",
            [],
            "model.tasks.x.num_classes: expected an integer or null, got nan",
        ),
        (
            "model:\n  tasks: {'': {}}\n",
            [],
            "model.tasks: key '' is not a task name (expected printable text)",
        ),
        (
            "model:\n  tasks: {3: {}}\n",
            [],
            "model.tasks: key 3 is not a task name (expected printable text)",
        ),
        (
            "model:\n  tasks: [{kind: binary}]\n",
            [],
            "model.tasks[0].name: missing; each task of a list names itself",
        ),
    ],
)
def test_any_yaml_value_gives_one_config_error_line_naming_the_key(tmp_path, text, sets, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, sets)
    assert str(err.value).removeprefix(f"{path}: ") == message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("? [1, 2]\n: 3\n", "not valid YAML (found unhashable key"),
        ("train:\n  epochs: " + "1" * 5000 + "\n", "not valid YAML (Exceeds the limit"),
        ("[" * 3000 + "\n", "not valid YAML (nested too deeply)"),
        ("data:\n  options: &a {x: *a}\n", "data.options.x: expected plain data"),
        ("train:\n  lr: '" + "x" * 500 + "'\n", "train.lr: expected a finite number, got 'xxx"),
    ],
)
def test_unreadable_or_huge_values_give_one_short_line(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value).removeprefix(f"{path}: ")
    assert message.startswith(expected) and "\n" not in message and len(message) < 250


def test_a_file_that_is_not_text_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="bad.yaml: not UTF-8 text"):
        load_config(path)


def test_overrides_copy_what_they_change_and_fill_missing_mappings():
    values = {"data": {"grid": {"stride": 2}}, "model": None}
    out = apply_overrides(values, ["data.grid.stride=3", "model.tasks.t.kind=binary"])
    assert values == {"data": {"grid": {"stride": 2}}, "model": None}
    assert out == {"data": {"grid": {"stride": 3}}, "model": {"tasks": {"t": {"kind": "binary"}}}}
    config = config_from_dict(out)
    assert config.data.grid.stride == 3 and config.model.tasks[0].num_outputs == 1


def test_an_empty_section_takes_the_defaults_and_tasks_are_replaced_by_name(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("model:\ntrain:\n")
    assert load_config(path) == Config()
    config = replace_fields(Config(), tasks={"t": {"kind": "binary"}})
    assert [t.name for t in config.model.tasks] == ["t"]


def test_defaults_are_the_measured_values_and_the_paper_configs_pin_the_reference():
    defaults = Config()
    assert defaults.model.query_std == 0.02 and defaults.selection.distinct is True
    assert reference_departures(defaults) == [
        "model.query_std=0.02 (reference: 1.0)",
        "selection.distinct=true (reference: false)",
    ]
    for name in ("megapixel_mnist", "camelyon16", "traffic_signs"):
        paper = load_config(resolve_config_path(name))
        assert paper.model.query_std == REFERENCE["model.query_std"], name
        assert paper.selection.distinct is REFERENCE["selection.distinct"], name
        assert reference_departures(paper) == [], name  # the reference recipe, whole


def test_reference_departures_follow_the_run_not_the_defaults():
    config = load_config(None, ["model.query_std=1.0", "train.min_lr_ratio=0.5"])
    assert reference_departures(config) == [
        "selection.distinct=true (reference: false)",
        "train.min_lr_ratio=0.5 (reference: 0.001)",
    ]


@pytest.mark.parametrize("value", ["0", "-1", ".nan"])
def test_a_positional_scale_that_is_not_positive_is_refused_by_name(value):
    with pytest.raises(ConfigError, match=r"model\.pos_scale"):
        load_config(None, [f"model.pos_scale={value}"])
