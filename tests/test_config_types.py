"""Typed run configs: every field is converted to its declared type, whether it came from YAML or a
`key=value` override (YAML 1.1 reads `3e-4` as a string), model-section fields included; a value
that cannot be converted is a ConfigError naming the key, the value and the type."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

import pytest

from pipeline.config_utils import convert, from_dict
from pipeline.errors import ConfigError
from pipeline.model.config import YaRNScaling
from pipeline.train.config import load_run_config
from tests.runs import write_run_config


@pytest.fixture
def load(tmp_path):
    def make(*overrides, **sections):
        path = write_run_config(tmp_path / "run.yaml", tmp_path / "data", tmp_path / "run", **sections)
        return load_run_config(path, list(overrides))

    return make


def test_floats_written_as_everyone_writes_them(load):
    cfg = load("optim.lr=3e-4", "optim.min_lr=1e-5", "optim.eps=1e-8", "train.peak_tflops=1e3")
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.eps, cfg.train.peak_tflops) == (3e-4, 1e-5, 1e-8, 1000.0)
    assert all(type(v) is float for v in (cfg.optim.lr, cfg.optim.min_lr, cfg.train.peak_tflops))


def test_yaml_file_values_are_typed(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent("""\
        data: {train: [d], seq_len: '64'}
        optim: {lr: 3e-4, warmup_steps: 1e2, min_lr: 0}
        train: {steps: '20', spike_sigma: 6, peak_tflops: null}
        parallel: {activation_checkpointing: 'true'}
        model: {preset: debug, n_layer: '2', rope_theta: 1e4, moe_layers: ['0', 1], capacity_factor: 1.25e0,
                rope_scaling: {factor: '8', beta_fast: 32}, use_aux_loss: 'false'}
    """))
    cfg = load_run_config(path)
    assert cfg.optim.lr == 3e-4 and cfg.optim.warmup_steps == 100 and type(cfg.optim.warmup_steps) is int
    assert cfg.optim.min_lr == 0.0 and type(cfg.optim.min_lr) is float
    assert cfg.data.seq_len == 64 and cfg.train.steps == 20 and cfg.train.spike_sigma == 6.0
    assert cfg.train.peak_tflops is None and cfg.parallel.activation_checkpointing is True
    m = cfg.model
    assert (m["n_layer"], m["rope_theta"], m["moe_layers"], m["capacity_factor"]) == (2, 1e4, [0, 1], 1.25)
    assert m["rope_scaling"] == YaRNScaling(factor=8.0, beta_fast=32.0) and m["use_aux_loss"] is False
    assert m["preset"] == "debug"


@pytest.mark.parametrize("override, message", [
    ("train.steps=abc", "config key train.steps = 'abc' is not a valid int"),
    ("train.steps=2.5", "config key train.steps = 2.5 is not a valid int"),
    ("optim.lr=fast", "config key optim.lr = 'fast' is not a valid float"),
    ("optim.lr=nan", "config key optim.lr = 'nan' is not a valid float"),
    ("optim.lr=[1]", "config key optim.lr = [1] is not a valid float"),
    ("train.micro_batch_size=true", "config key train.micro_batch_size = True is not a valid int"),
    ("parallel.activation_checkpointing=maybe",
     "config key parallel.activation_checkpointing = 'maybe' is not a valid bool"),
    ("train.peak_tflops=lots", "config key train.peak_tflops = 'lots' is not a valid float"),
    ("data.train=d", "config key data.train = 'd' must be a list"),
    ("model.n_experts=three", "config key model.n_experts = 'three' is not a valid int"),
    ("model.moe_layers=[0, x]", "config key model.moe_layers[1] = 'x' is not a valid int"),
    ("model.rope_scaling.factor=big", "config key model.rope_scaling.factor = 'big' is not a valid float"),
    ("model.rope_scaling=4", "config key model.rope_scaling = 4 must be a mapping of YaRNScaling fields"),
])
def test_unconvertible_values_name_key_value_and_type(load, override, message):
    with pytest.raises(ConfigError) as err:
        load(override)
    assert message in str(err.value)


def test_model_keys_that_are_not_model_fields_pass_through(load):
    # `preset` (and keys other components own) are checked where they are used, not here.
    assert load("model.preset=debug").model == {"preset": "debug"}


@dataclass(kw_only=True)
class Inner:
    ratio: float = 0.5


@dataclass(kw_only=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    sizes: list[int] = field(default_factory=list)
    name: str = "x"
    tag: str | None = None


def test_convert_nested_lists_and_optionals():
    out = from_dict(Outer, {"inner": {"ratio": "1e-3"}, "sizes": ["4", 8, 1e1], "name": 7, "tag": None})
    assert out == Outer(inner=Inner(ratio=1e-3), sizes=[4, 8, 10], name="7", tag=None)
    assert convert("False", bool, "k") is False and convert("yes", bool, "k") is True
    with pytest.raises(ConfigError, match=r"config key inner.ratio = \[1\] is not a valid float"):
        from_dict(Outer, {"inner": {"ratio": [1]}})
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(Outer, {"inner": {"rate": 1}})
