"""Weight files: formats, nesting, prefixes, and strict loading that names what does not fit."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from ips.weights import load_strict, mismatches, read_state_dict, strip_prefixes


def _module() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))


FILES = [
    (s, w) for s in (".bin", ".pth") for w in ("plain", "state_dict", "model", "module_prefix")
]
FILES += [(".safetensors", "plain"), (".safetensors", "module_prefix")]  # flat tensors only


@pytest.mark.parametrize(("suffix", "wrap"), FILES)
def test_weight_files_read_in_every_format_nesting_and_prefix(tmp_path, suffix, wrap):
    state = _module().state_dict()
    stored = {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state, "optimizer": {}},
        "module_prefix": {f"module.backbone.{k}": v for k, v in state.items()},
    }[wrap]
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in stored.items()}, str(path))
    else:
        torch.save(stored, path)
    read = read_state_dict(path)
    assert read.keys() == state.keys()
    assert all(torch.equal(read[k], state[k]) for k in state)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"weight": torch.zeros(1), "callback": print}, path)  # a function: not data
    with pytest.raises(ValueError, match="refused, since unpickling it could run code"):
        read_state_dict(path)


def test_strict_loading_names_the_file_the_model_and_the_first_offending_key():
    module = _module()
    good = {k: v.clone() for k, v in module.state_dict().items()}
    cases = {
        "extra": ({**good, "1.gamma": torch.ones(3)}, "1.gamma is unexpected"),
        "missing": ({k: v for k, v in good.items() if k != "1.bias"}, "1.bias is missing"),
        "shape": ({**good, "0.weight": torch.zeros(3, 5)}, "0.weight has shape (3, 5)"),
    }
    for state, named in cases.values():
        with pytest.raises(ValueError, match=re.escape(f"w.bin does not fit tiny: {named}")):
            load_strict(module, state, source="w.bin", model="tiny")
    load_strict(module, good, source="w.bin", model="tiny")  # an exact fit loads


def test_ignored_prefixes_may_be_extra_and_nothing_else():
    module = _module()
    state = {**module.state_dict(), "fc.weight": torch.zeros(2, 2)}
    assert mismatches(module.state_dict(), state, ignore=("fc.",)) == []
    load_strict(module, state, source="w", model="m", ignore=("fc.",))
    assert mismatches(module.state_dict(), state) == [
        "fc.weight is unexpected (not part of the model)"
    ]


def test_a_prefix_is_stripped_only_when_every_key_has_it():
    assert strip_prefixes({"module.a": 1, "module.b": 2}, ["module."]) == {"a": 1, "b": 2}
    assert strip_prefixes({"module.a": 1, "b": 2}, ["module."]) == {"module.a": 1, "b": 2}
