from __future__ import annotations

from pathlib import Path

import pytest

from ips.config import Config, config_from_dict, config_to_dict, load_config, replace_fields

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
