"""The rules every stage's options follow: one hash rule, help on every option, bounds on every number,
no NaN or infinity taken as a setting, and no NaN or Infinity written into JSON."""
import dataclasses
import importlib
import inspect
import json
import os

import click
import numpy as np
import pytest

from helpers import invoke, make_store, random_sae, sample_docs, write_jsonl
from ssae_common.core.config import (ConfigError, field_types, hashed_values, option, option_specs,
                                     unhashed_fields)
from ssae_common.core.provenance import config_hash
from ssae_common.core.records import dump_json, finite, to_json
from ssae_common.data.config import HarvestConfig
from ssae_common.eval.config import EvalConfig
from ssae_common.explain.config import ExplainConfig
from ssae_common.retrieval.config import RetrieveConfig
from ssae_common.sae.config import ExportConfig, FitConfig
from ssae_common.shift.config import ShiftConfig
from ssae_tools.base import TOOLS, ListOf, _base_type

CONFIGS = {"retrieve": RetrieveConfig, "harvest": HarvestConfig, "fit": FitConfig, "eval": EvalConfig,
           "explain": ExplainConfig, "shift": ShiftConfig, "export": ExportConfig}
# the stage modules whose output hash is built by hashed_values (the one rule)
STAGES = {"retrieve": "ssae_common.retrieval.stage", "harvest": "ssae_common.data.stage",
          "fit": "ssae_common.sae.stage", "eval": "ssae_common.eval.stage", "explain": "ssae_common.explain.stage",
          "shift": "ssae_common.shift.stage", "export": "ssae_common.sae.export"}
# numeric options where a negative value means something (each with what it means)
SIGNED = {("fit", "tilt"): "TERM with t < 0 down-weights the tokens with the largest loss"}


def _changed(value, spec, annotation):
    """Another value of the field's type (not necessarily a valid one: the hash does not check)."""
    if spec.choices:
        return next(c for c in spec.choices if c != value)
    base = _base_type(annotation)
    if isinstance(value, tuple):
        return (*value, "other")
    if base is bool:
        return not value
    if base is int:
        return (value or 1) + 1
    if base is float:
        return (value or 0.0) + 0.25
    return (value or "") + "other"


def _base_config(cls):
    required = {f.name: ("x",) if _base_type(f.type) is str and "tuple" in str(f.type) else "x"
                for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    return cls(**required)


@pytest.mark.parametrize("tool", sorted(CONFIGS))
def test_every_hashed_field_changes_the_hash_and_no_other_does(tool):
    cls = CONFIGS[tool]
    base = _base_config(cls)
    digest = config_hash(hashed_values(base))
    types = field_types(cls)
    unhashed = unhashed_fields(cls)
    for name, spec in option_specs(cls).items():
        changed = dataclasses.replace(base, **{name: _changed(getattr(base, name), spec, types[name])})
        if name in unhashed:
            assert config_hash(hashed_values(changed)) == digest, f"{tool}: {name} is declared not hashed"
        else:
            assert config_hash(hashed_values(changed)) != digest, f"{tool}: changing {name} keeps the hash"
    assert all(unhashed.values())  # each with its reason
    # the stage builds its output's hash by this rule, not from a list of its own
    assert "hashed_values(" in inspect.getsource(importlib.import_module(STAGES[tool]))


def test_a_field_left_out_of_the_hash_says_why_and_cannot_be_overridden():
    with pytest.raises(TypeError, match="needs why="):
        option(1, hashed=False)
    with pytest.raises(TypeError, match="chunk_rows is declared not hashed"):
        hashed_values(ExplainConfig(activations="a.h5"), chunk_rows=5)
    # an override replaces a field by the form that is hashed (here a model's identity)
    assert hashed_values(HarvestConfig(), model="id")["model"] == "id"
    assert "layer" not in hashed_values(HarvestConfig(layer=3))  # resolve() turns it into the hook


@pytest.mark.parametrize("tool", TOOLS)
def test_every_option_has_help_and_every_number_a_lower_bound(tool):
    params = importlib.import_module(f"ssae_tools.{tool}").main.params
    specs = option_specs(CONFIGS[tool]) if tool in CONFIGS else {}
    types = field_types(CONFIGS[tool]) if tool in CONFIGS else {}
    for p in params:
        if not isinstance(p, click.Option) or p.name in ("help", "version"):
            continue
        assert p.help, f"ssae-{tool} {p.opts[0]} has no help"
        if p.name in specs and specs[p.name].cli:
            spec = specs[p.name]
            if _base_type(types[p.name]) in (int, float) and spec.choices is None:
                assert spec.min is not None or spec.above is not None or (tool, p.name) in SIGNED, \
                    f"ssae-{tool} {p.opts[0]}: a number without a lower bound"
        elif isinstance(p.type, (click.types.IntParamType, click.types.FloatParamType, ListOf)):
            bounded = getattr(p.type, "min", None) is not None
            assert bounded, f"ssae-{tool} {p.opts[0]}: a number without a lower bound"


# ------------------------------------------------------------------------------ numbers are numbers


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("options")
    acts = make_store(folder / "acts.h5", np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32))
    sae = folder / "sae"
    sae.mkdir()
    random_sae(16, 32).save(str(sae))
    docs = write_jsonl(str(folder / "docs.jsonl"), sample_docs(20))
    return {"acts": str(acts), "sae": str(sae), "docs": docs, "folder": folder}


def _main(tool):
    return importlib.import_module(f"ssae_tools.{tool}").main


CASES = [
    ("fit", ["{acts}", "--tilt-ess", "nan"], "--tilt-ess nan: not a number"),
    ("fit", ["{acts}", "--architecture", "jumprelu", "--bandwidth", "nan"], "--bandwidth nan: not a number"),
    ("fit", ["{acts}", "--architecture", "jumprelu", "--l0", "nan"], "--l0 nan: not a number"),
    ("fit", ["{acts}", "--tilt", "inf"], "--tilt inf: must be finite"),
    ("fit", ["{acts}", "--tilt", "0,nan"], "--tilt nan: not a number"),  # a swept value too
    ("fit", ["{acts}", "--lr", "-inf"], "--lr -inf: must be finite"),
    ("fit", ["{acts}", "--k", "-3"], "--k -3: must be at least 1"),
    ("eval", ["{sae}", "--activations", "{acts}", "--dense-threshold", "nan"], "--dense-threshold nan: not a number"),
    ("eval", ["{sae}", "--activations", "{acts}", "--dense-threshold", "-1"], "--dense-threshold -1.0: must be at least 0"),
    ("eval", ["{sae}", "--activations", "{acts}", "--dense-threshold", "-3"], "--dense-threshold -3.0: must be at least 0"),
    ("eval", ["{sae}", "--activations", "{acts}", "--dense-threshold", "1.5"], "--dense-threshold 1.5: must be at most 1"),
    ("explain", ["{sae}", "--activations", "{acts}", "--temperature", "nan"], "--temperature nan: not a number"),
    ("explain", ["{sae}", "--activations", "{acts}", "--timeout", "inf"], "--timeout inf: must be finite"),
    ("retrieve", ["{docs}", "--corpus", "{docs}", "--rerank", "tracin", "--sae", "{sae}", "--rerank-pool", "nan"],
     "--rerank-pool nan: not a number"),
    ("retrieve", ["{docs}", "--corpus", "{docs}", "--k1", "nan"], "--k1 nan: not a number"),
    ("shift", ["--data", "{docs}", "--sae", "{sae}", "--probe-c", "nan"], "--probe-c nan: not a number"),
    ("shift", ["--data", "{docs}", "--sae", "{sae}", "--auto-min-drop", "-1"], "--auto-min-drop -1.0: must be at least 0"),
    ("harvest", ["{docs}", "--layer", "-2"], "--layer -2: must be at least 0"),
]


@pytest.mark.parametrize("tool,args,message", CASES, ids=[f"{c[0]} {' '.join(c[1][-2:])}" for c in CASES])
def test_nan_infinity_and_out_of_range_are_refused_naming_the_flag(inputs, tool, args, message, monkeypatch):
    from ssae_common.retrieval import engines as R

    monkeypatch.chdir(inputs["folder"])
    out = inputs["folder"] / f"out-{tool}"
    result = invoke(_main(tool), [a.format(**inputs) for a in args] + ["-o", out], code=2)
    assert result.stderr == f"ssae-{tool}: error: {message}\n"
    assert result.stdout == "" and not out.exists()
    assert not os.path.exists(R.index_dir())  # refused before any corpus pass


@pytest.mark.parametrize("source", ["env", "json", "toml"])
def test_nan_is_refused_from_variables_and_config_files(inputs, source, monkeypatch, tmp_path):
    args = [inputs["acts"], "-o", tmp_path / "sae"]
    if source == "env":
        monkeypatch.setenv("SSAE_FIT_TILT_ESS", "nan")
    else:
        path = tmp_path / f"c.{source}"
        path.write_text('{"tilt_ess": NaN}' if source == "json" else "tilt_ess = nan\n")
        args += ["--config", path]
    result = invoke(_main("fit"), args, code=2)
    assert result.stderr == "ssae-fit: error: --tilt-ess nan: not a number\n"
    assert not (tmp_path / "sae").exists()


def test_python_callers_get_the_field():
    with pytest.raises(ConfigError) as e:
        FitConfig(tilt_ess=float("nan")).check()
    assert e.value.field_name == "tilt_ess" and str(e.value) == "tilt_ess nan: not a number"


def test_json_written_is_strict(tmp_path):
    value = {"a": float("nan"), "b": [np.float32("inf"), np.float64(2.5), np.int64(3)], "c": (1.0, -float("inf"))}
    assert finite(value) == {"a": None, "b": [None, 2.5, 3], "c": [1.0, None]}
    text = to_json(value)
    assert text == '{"a": null, "b": [null, 2.5, 3], "c": [1.0, null]}'
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    with open(tmp_path / "x.json", "w") as f:
        dump_json({"auc": float("nan")}, f)
    assert (tmp_path / "x.json").read_text() == '{"auc": null}'
