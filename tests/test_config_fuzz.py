"""Property tests: any YAML value anywhere in a config, and any ``--set`` text, gives a Config
or one `ConfigError` line naming the key, never a traceback."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import pickle
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ips.cli import main
from ips.config import (
    AMP_MODES,
    LOADING_MODES,
    POS_ENCODINGS,
    SECTIONS,
    TASK_KINDS,
    TISSUE_MODES,
    AugmentConfig,
    Config,
    GridConfig,
    TaskSpec,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
)
from ips.errors import ConfigError

FAST = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


FIELDS = {section: _names(cls) for section, cls in SECTIONS.items()}
FIELDS["data"].append("stride")  # the older name of data.grid.stride
WORDS = sorted(
    {*TASK_KINDS, *LOADING_MODES, *TISSUE_MODES, *POS_ENCODINGS, *AMP_MODES}
    | {"fail", "skip", "label", "megapixel_mnist", "resnet18_2blocks", "3e-4", "1e400", "nan"}
)
HUGE = [2**63 - 1, 2**63, -(2**63) - 1, 10**30, 10**400]  # 10**400: beyond the floats

# ---- strategies: YAML-like data, with the real section and key names mixed in -------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 300),
    st.integers(),
    st.sampled_from(HUGE),
    st.floats(),  # nan and inf among them
    st.sampled_from([math.nan, math.inf, -math.inf, 1e-3, 0.5, 1.0, 2.5]),
    st.sampled_from(WORDS),
    st.text(max_size=8),
)
odd_keys = st.one_of(  # keys YAML allows that are not names
    st.text(max_size=6),
    st.integers(-2, 2),
    st.none(),
    st.booleans(),
    st.tuples(st.integers(0, 2)),
    st.sampled_from(["", " ", "a\nb", "x" * 200]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(odd_keys, inner, max_size=3),
    max_leaves=6,
)


def _mapping_of(names: list[str], value_for) -> st.SearchStrategy:
    """Mappings of some of ``names`` (each with a value of its own kind) and odd keys."""
    pairs = st.one_of(
        *(st.tuples(st.just(name), value_for(name)) for name in names),
        st.tuples(odd_keys, values),
    )
    return st.lists(pairs, max_size=4).map(dict)


def _task_value(name: str) -> st.SearchStrategy:
    special = {"kind": st.sampled_from(TASK_KINDS), "num_classes": st.integers(-1, 5)}
    return special.get(name, values) | values


tasks = st.one_of(
    st.dictionaries(
        st.sampled_from(["majority", "x", ""]) | odd_keys,
        _mapping_of(_names(TaskSpec), _task_value) | values,
        max_size=3,
    ),
    st.lists(_mapping_of(_names(TaskSpec), _task_value) | values, max_size=3),
    values,
)


def _field_value(name: str) -> st.SearchStrategy:
    nested = {
        "grid": _mapping_of(_names(GridConfig), lambda _: values),
        "augment": _mapping_of(_names(AugmentConfig), lambda _: values),
        "tasks": tasks,
    }
    return nested.get(name, values) | values


sections = {name: _mapping_of(FIELDS[name], _field_value) | values for name in SECTIONS}
configs = _mapping_of(list(SECTIONS), sections.__getitem__)

known_keys = st.sampled_from(
    [f"{section}.{key}" for section, keys in FIELDS.items() for key in keys]
    + ["data.grid.stride", "data.grid.level", "data.augment.hue", "model.tasks.x.kind"]
)
dotted = known_keys | st.lists(
    st.sampled_from([*SECTIONS, *{k for ks in FIELDS.values() for k in ks}, "x"])
    | st.text(max_size=4),
    max_size=4,
).map(".".join)
raw_values = st.one_of(
    values.filter(lambda v: not _too_long(v)).map(
        lambda v: yaml.safe_dump(v, default_flow_style=True).strip()
    ),
    st.text(max_size=10),
    st.sampled_from(["[", "{a", "a: b: c", "!!python/object:os.system", ".nan", "1e400"]),
)
overrides = st.lists(
    st.one_of(st.builds(lambda key, raw: f"{key}={raw}", dotted, raw_values), st.text(max_size=12)),
    max_size=3,
)


def _too_long(value) -> bool:
    """Whether YAML cannot write ``value`` (an int beyond sys.get_int_max_str_digits)."""
    try:
        repr(value)
    except ValueError:
        return True
    return False


def _assert_one_line(err: ConfigError) -> str:
    message = str(err)
    assert message and "\n" not in message and "\r" not in message, repr(message)
    assert "Traceback" not in message
    return message


# ---- properties -------------------------------------------------------------------------


@FAST
@given(configs | values)
def test_config_from_dict_gives_a_config_or_one_config_error_line(data):
    try:
        config = config_from_dict(data)
    except ConfigError as err:
        _assert_one_line(err)
    else:  # and what it accepts survives being stored as plain data
        assert isinstance(config, Config)
        stored = config_to_dict(config)
        assert config_to_dict(config_from_dict(stored)) == stored


@FAST
@given(st.sampled_from([(s, k) for s, keys in FIELDS.items() for k in keys]), st.data())
def test_a_bad_value_of_a_known_key_is_named_by_its_dotted_key(place, data):
    section, key = place
    value = data.draw(_field_value(key))
    try:
        config_from_dict({section: {key: value}})
    except ConfigError as err:
        message = _assert_one_line(err)
        named = "data.grid" if (section, key) == ("data", "stride") else f"{section}.{key}"
        assert named in message, message


@FAST
@given(configs | values, overrides)
def test_apply_overrides_leaves_its_input_and_raises_only_config_errors(data, sets):
    before = pickle.dumps(data)
    try:
        out = apply_overrides(data, sets)
    except ConfigError as err:
        _assert_one_line(err)
    else:
        assert isinstance(out, dict)
    assert pickle.dumps(data) == before


@settings(FAST, max_examples=60)
@given(configs.filter(lambda c: not _too_long(c)), overrides)
def test_load_config_reads_any_yaml_file_with_any_overrides(data, sets):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.yaml"
        path.write_text(yaml.safe_dump(data))
        try:
            assert isinstance(load_config(path, sets), Config)
        except ConfigError as err:
            _assert_one_line(err)


@settings(FAST, max_examples=60)
@given(st.text(max_size=40) | st.binary(max_size=20))
def test_load_config_reads_any_text(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.yaml"
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        try:
            assert isinstance(load_config(path), Config)
        except ConfigError as err:
            assert _assert_one_line(err).startswith(str(path))


# settings every CLI example ends with: a valid config stops (exit 2) where its data opens (the
# dataset's checks of the config, then the missing file), before anything trains, downloads
# weights or changes torch's global state
STOP_AT_DATA = [
    "data.dataset=megapixel_mnist",
    "data.path=/no/such/data.npz",
    "model.pretrained=false",
    "train.deterministic=false",
]


@settings(FAST, max_examples=25)
@given(configs.filter(lambda c: not _too_long(c)), overrides)
def test_ips_train_answers_any_config_with_exit_2_and_one_error_line(data, sets):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.yaml"
        path.write_text(yaml.safe_dump(data))
        argv = ["train", "--config", str(path), "--out", str(Path(folder) / "run")]
        argv += [f"--set={item}" for item in [*sets, *STOP_AT_DATA]]
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    lines = stderr.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ips: error: "), lines
