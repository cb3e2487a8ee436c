"""Hydra glue: register raymoe.config dataclasses as schemas and turn a composed DictConfig into typed objects.

``platform/`` never imports Hydra; this module is where YAML meets the dataclasses. Errors from either side (Hydra's
"Key 'x' not in 'TrainConfig'", a type error, or a ``ConfigError`` raised by a dataclass ``__post_init__``) surface as
:class:`InvalidConfig` with one readable line, before any actor starts.
"""
from __future__ import annotations

from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from raymoe.config import ConfigError, RunConfig

__all__ = ["register", "to_run_config", "InvalidConfig"]

T = TypeVar("T")
_registered = False


class InvalidConfig(ValueError):
    """An invalid override or combination; jobs print it on one line and exit with status 2."""

    def __init__(self, msg: str) -> None:
        super().__init__(f"invalid configuration: {msg}")
        self.msg = msg


def register() -> None:
    """Register ``run_schema`` (the root schema). Group YAMLs are typed through RunConfig's fields."""
    global _registered
    if _registered:
        return
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    _registered = True


def to_object(cfg: DictConfig, cls: type[T]) -> T:
    """Instantiate the dataclass tree (runs every ``__post_init__``), mapping failures to :class:`InvalidConfig`."""
    try:
        obj = OmegaConf.to_object(cfg)
    except ConfigError as e:
        raise InvalidConfig(str(e)) from e
    except OmegaConfBaseException as e:
        cause = e.__cause__ if isinstance(e.__cause__, ConfigError) else None
        raise InvalidConfig(str(cause or e).splitlines()[0]) from e
    except (TypeError, ValueError) as e:
        raise InvalidConfig(str(e)) from e
    if not isinstance(obj, cls):
        raise InvalidConfig(f"expected a {cls.__name__} config, got {type(obj).__name__}")
    return obj


def to_run_config(cfg: DictConfig) -> RunConfig:
    return to_object(cfg, RunConfig)


def flat_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Sorted dotted keys of a config (used by the test that makes every new knob a deliberate change)."""
    out: list[str] = []
    node = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += flat_keys(v, key + ".")
        else:
            out.append(key)
    return sorted(out)
