"""Registry and config tests, parametrised over every registered method (a new method is tested
the moment it registers)."""
import os
import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR, REPO, ci_overrides, compose
from trustlab.platform.config import ConfigError, group_options
from trustlab.platform.registry import UnknownMethodError, get_method, list_methods, register_method
from trustlab.platform.tune import validate_space

METHODS = list_methods()


def test_registry_lists_f2c_and_rejects_unknown():
    assert "f2c" in METHODS and METHODS == sorted(METHODS)
    with pytest.raises(UnknownMethodError, match="valid choices: .*f2c"):
        get_method("no-such-method")


def test_register_twice_with_another_class_fails():
    @register_method("tmp-dup")
    class A:  # noqa: N801
        pass

    with pytest.raises(ValueError, match="registered twice"):
        @register_method("tmp-dup")
        class B:  # noqa: N801
            pass


def test_every_method_yaml_has_a_registered_module():
    assert sorted(group_options(CONF_DIR, "method")) == METHODS


@pytest.mark.parametrize("name", METHODS)
def test_method_contract(name):
    m = get_method(name)
    assert m.name == name and isinstance(m.modality, str) and m.modality
    cfg = compose([f"method={name}"])
    stages = m.stages(cfg)
    assert stages and all(isinstance(s, str) for s in stages)
    for attr in ("build_data", "build_model", "loss_step", "predict"):
        assert callable(getattr(m, attr)), attr


@pytest.mark.parametrize("name", METHODS)
def test_method_yaml_composes_with_and_without_ci_overrides(name):
    cfg = compose([f"method={name}"])
    assert cfg["method"]["name"] == name
    small = compose([f"method={name}", *ci_overrides(name)])
    assert small["method"]["name"] == name
    assert ci_overrides(name), "ci_overrides must shrink the run for tests"


@pytest.mark.parametrize("name", METHODS)
def test_tune_space_declared_and_valid(name):
    cfg = compose([f"method={name}"])
    validate_space(cfg["method"]["tune"]["space"], cfg)
    assert cfg["method"]["tune"]["metric"]


def _uncommented_knobs(path):
    bad = []
    for i, line in enumerate(open(path), 1):
        s = line.rstrip("\n")
        if not s.strip() or s.lstrip().startswith("#") or s.lstrip().startswith("- "):
            continue
        if re.match(r"^\s*[\w.]+\s*:", s) and "#" not in s:
            # a mapping key whose value is a nested block must be commented too, except 'defaults'
            if s.strip() != "defaults:":
                bad.append(f"{os.path.basename(path)}:{i}: {s.strip()}")
    return bad


def test_every_config_knob_has_a_comment():
    bad = []
    for root, _, files in os.walk(CONF_DIR):
        for f in files:
            if f.endswith(".yaml"):
                bad += _uncommented_knobs(os.path.join(root, f))
    assert not bad, "uncommented knobs:\n" + "\n".join(bad)


@pytest.mark.parametrize("group", ["data", "trainer", "tune", "serve", "tracking"])
def test_every_group_option_composes(group):
    for opt in group_options(CONF_DIR, group):
        cfg = compose([f"{group}={opt}"])
        assert group in cfg


def test_space_validation_errors():
    cfg = compose([])
    with pytest.raises(ConfigError, match="not a config key"):
        validate_space({"method.nope": {"type": "uniform", "low": 0, "high": 1}}, cfg)
    with pytest.raises(ConfigError, match="low < high"):
        validate_space({"method.tau": {"type": "uniform", "low": 1, "high": 0}}, cfg)
    with pytest.raises(ConfigError, match="type must be"):
        validate_space({"method.tau": {"type": "gaussian", "low": 0, "high": 1}}, cfg)
    with pytest.raises(ConfigError, match="loguniform needs low > 0"):
        validate_space({"trainer.lr": {"type": "loguniform", "low": 0, "high": 1}}, cfg)
    with pytest.raises(ConfigError, match="unknown"):
        validate_space({"method.tau": {"type": "uniform", "low": 0, "high": 1, "hgih": 2}}, cfg)


def _run(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "experiments", "run.py"), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, pattern", [
    (["method=nope"], r"unknown method 'nope'; valid choices: .*f2c"),
    (["trainer.nope=1"], r"bad override: Could not override 'trainer.nope'.*top-level keys"),
    (["trainer.epochs=abc"], r"trainer.epochs must be a positive integer"),
    (["mode=dance"], r"unknown mode 'dance'; valid choices: train, eval, tune, serve"),
    (["tune=nope"], r"unknown tune 'nope'; valid choices: default"),
    (["overrides_file=/nonexistent.yaml"], r"cannot read overrides_file"),
])
def test_entry_point_bad_input_is_one_line_exit_2(args, pattern):
    r = _run(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and re.search(pattern, lines[0]), r.stderr


def test_bad_space_in_a_method_yaml_fails_at_load(tmp_path):
    import shutil

    from trustlab.platform.config import compose as raw_compose

    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    y = conf / "method" / "f2c.yaml"
    y.write_text(y.read_text().replace("method.tau: {type: uniform, low: 0.0, high: 0.5}",
                                       "method.tau: {type: uniform, low: 0.6, high: 0.5}"))
    with pytest.raises(ConfigError, match=r"tune.space\['method.tau'\].*low < high"):
        raw_compose(str(conf), ["method=f2c"])


def test_overrides_file_expands_into_overrides(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "experiments"))
    from run import expand_overrides_file

    f = tmp_path / "best.yaml"
    f.write_text("overrides:\n  - method.tau=0.23\n  - trainer.lr=0.001\n")
    args = expand_overrides_file(["method=f2c", f"overrides_file={f}"])
    assert args == ["method=f2c", "method.tau=0.23", "trainer.lr=0.001"]
    cfg = compose(args)
    assert cfg["method"]["tau"] == 0.23 and cfg["trainer"]["lr"] == 0.001


def _imported_modules(path: str) -> set[str]:
    import ast

    tree = ast.parse(open(path).read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_platform_imports_no_method():
    """The arrows point one way: methods -> platform. (The registry finds the families by
    importing the ``trustlab.methods`` package by name at run time, which names no method.)"""
    root = os.path.join(REPO, "trustlab", "platform")
    bad = []
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                p = os.path.join(d, f)
                bad += [f"{os.path.relpath(p, REPO)}: {m}" for m in _imported_modules(p)
                        if m.startswith("trustlab.methods") or m.startswith("trustlab.serve")]
    assert not bad, bad


@pytest.mark.parametrize("name", METHODS)
def test_method_meets_the_protocol_by_composition(name):
    """Every method is a plain object with the Protocol's members: no implementation base class,
    and the registered object takes no state (hooks get the step and context they need)."""
    from trustlab.platform.method import Method

    m = get_method(name)
    assert isinstance(m.impl, Method), f"{name} lacks a required member of trustlab.platform.method.Method"
    assert type(m.impl).__mro__[1:] == (object,), f"{name} inherits {type(m.impl).__mro__[1:-1]}"
    with pytest.raises(AttributeError, match="holds no state"):
        m.anything = 1


def test_a_swept_data_key_makes_each_trial_build_its_data():
    """A key the data is built from (``method.data.clip_len``) would change nothing if the
    trials shared data built once before them: such a sweep builds each trial's data from the
    trial's own config; a sweep of model keys only shares the driver's data."""
    from trustlab.platform.tune import data_keys, trial_data

    space = compose(["method=stdt"])["method"]["tune"]["space"]
    assert data_keys(space) == ["method.data.clip_len"]
    assert data_keys({"method.tau": {}, "trainer.lr": {}}) == []

    class Fake:
        def build_data(self, cfg):
            return {"clip_len": cfg["method"]["data"]["clip_len"]}

    cfg = {"method": {"data": {"clip_len": 16}}}
    assert trial_data(Fake(), cfg, None) == {"clip_len": 16}  # the trial's own value
    shared = {"clip_len": 8}
    assert trial_data(Fake(), cfg, shared) is shared
