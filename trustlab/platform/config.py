"""Configs: Hydra composition from ``experiments/conf`` -> validated plain dicts.

Everything that crosses into Ray is a plain ``dict`` (``OmegaConf.to_container(resolve=True)``):
``${hydra:...}`` interpolations do not resolve inside workers. Composition errors become a
``ConfigError`` with one line that names the valid choices.
"""
from __future__ import annotations

import os

from omegaconf import OmegaConf

GROUPS = ("method", "data", "trainer", "tune", "serve", "tracking")


class ConfigError(ValueError):
    """A bad override or an unknown group option; the message is one line for the user."""


def group_options(conf_dir: str, group: str) -> list[str]:
    d = os.path.join(conf_dir, group)
    if not os.path.isdir(d):
        return []
    return sorted(f[:-5] for f in os.listdir(d) if f.endswith(".yaml"))


def _check_group_overrides(conf_dir: str, overrides: list[str]) -> None:
    for ov in overrides:
        key, sep, val = ov.lstrip("+~").partition("=")
        if sep and key in GROUPS:
            opts = group_options(conf_dir, key)
            if val not in opts:
                raise ConfigError(f"unknown {key} {val!r}; valid choices: {', '.join(opts)}")


def compose(conf_dir: str, overrides: list[str] | None = None, config_name: str = "config") -> dict:
    """Compose the config with Hydra's compose API and return the resolved plain dict."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides or [])
    conf_dir = os.path.abspath(conf_dir)
    _check_group_overrides(conf_dir, overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            cfg = hcompose(config_name=config_name, overrides=overrides)
            plain = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"bad override: {first}; top-level keys: {', '.join(_top_keys(conf_dir))}") from None
    finally:
        GlobalHydra.instance().clear()
    validate(plain, conf_dir)
    return plain


def _top_keys(conf_dir: str) -> list[str]:
    base = OmegaConf.load(os.path.join(conf_dir, "config.yaml"))
    keys = [k for k in base.keys() if k != "defaults"]
    return sorted(set(keys) | set(GROUPS))


MODES = ("train", "eval", "tune", "serve", "export", "inspect")


def validate(cfg: dict, conf_dir: str | None = None) -> None:
    from trustlab.platform.registry import get_method, UnknownMethodError

    if cfg.get("mode") not in MODES:
        raise ConfigError(f"unknown mode {cfg.get('mode')!r}; valid choices: {', '.join(MODES)}")
    try:
        get_method(cfg["method"]["name"])
    except UnknownMethodError as e:
        raise ConfigError(str(e)) from None
    t = cfg["trainer"]
    for k in ("epochs", "num_workers", "batch_size"):
        if not isinstance(t.get(k), int) or t[k] < 1:
            raise ConfigError(f"trainer.{k} must be a positive integer, got {t.get(k)!r}")
    if float(t["cpus_per_worker"]) <= 0:
        raise ConfigError("trainer.cpus_per_worker must be > 0")
    from trustlab.platform.train import GRAD_SYNC, PLACEMENT_STRATEGIES, PRECISIONS

    for k, valid in (("precision", PRECISIONS), ("grad_sync", GRAD_SYNC), ("placement_strategy", PLACEMENT_STRATEGIES)):
        if k in t and str(t[k]) not in valid:
            raise ConfigError(f"trainer.{k} must be one of {', '.join(valid)}, got {t[k]!r}")
    lo = t.get("min_workers")
    if lo is not None and (not isinstance(lo, int) or not 1 <= lo <= t["num_workers"]):
        raise ConfigError(f"trainer.min_workers must be null or an integer in 1..num_workers, got {lo!r}")
    from trustlab.platform.tune import validate_space

    validate_space((cfg["method"].get("tune") or {}).get("space"), cfg)


def to_yaml(cfg: dict) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(cfg))


def apply_dotted(cfg: dict, flat: dict) -> dict:
    """Return a copy of ``cfg`` with ``{"method.tau": 0.2, ...}`` written in."""
    import copy

    out = copy.deepcopy(cfg)
    for key, val in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = val
    return out
