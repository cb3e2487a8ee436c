"""Hydra glue: register raymoe.config dataclasses as schemas, turn a composed DictConfig into typed objects, and run
a Hydra app so that every configuration error is one line on stderr and exit status 2.

``platform/`` never imports Hydra; this module is where YAML meets the dataclasses. Errors from either side surface as
:class:`InvalidConfig` with one readable line that names the key and what is allowed, before any actor starts:

* an unknown key (``train.nosuchkey=1``, or ``+train.nosuchkey=1``): the closest keys and the valid keys of that node;
* a wrong type (``train.steps=abc``): the type the dataclass field declares;
* an unknown option of a config group (``model=nosuch``): the available options;
* a malformed override (``train.steps``, ``train.steps=[``): the override and the parser's complaint;
* a ``ConfigError`` raised by a dataclass ``__post_init__`` (``model.n_group=3``): its message.

Entrypoints use :func:`hydra_app` instead of ``@hydra.main``::

    @hydra_app("train")              # conf/<config_name>.yaml in package raymoe.conf
    def main(cfg: DictConfig) -> None:
        run = to_run_config(cfg)     # raises InvalidConfig -> one line, exit 2
        ...

How: Hydra composes the config inside ``hydra.main`` and, on failure, prints its own multi-line report and exits with
status 1 before our code runs. Its documented ``HYDRA_FULL_ERROR=1`` switch makes it re-raise instead, so
:func:`hydra_app` sets that variable for the duration of the Hydra call (restoring the caller's value while the task
itself runs), catches what Hydra raises while composing and formats it. Everything ``hydra.main`` offers keeps working
(``--help``, ``--cfg job``, ``--info``, ``hydra.run.dir=...``, ``-m`` sweeps: each job of a sweep is composed the same
way). An exception raised by the task itself that is not :class:`InvalidConfig` propagates unchanged (traceback,
status 1). Set ``HYDRA_FULL_ERROR=1`` yourself to get Hydra's full traceback for a configuration error too.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import sys
import typing
from typing import Any, Callable, Optional, TypeVar, Union

from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ConfigTypeError, OmegaConfBaseException, ValidationError

from raymoe.config import ConfigError, RunConfig, TrainConfig

__all__ = [
    "register", "to_object", "to_run_config", "flat_keys", "InvalidConfig", "hydra_app", "explain_config_error",
    "EXIT_INVALID",
]

EXIT_INVALID = 2  # exit status of every entrypoint for an invalid override or combination

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
    """Instantiate the dataclass tree (runs every ``__post_init__``), mapping failures to :class:`InvalidConfig`.

    Keys the schema does not declare (added with ``+key=value``; OmegaConf would silently set them as attributes) are
    rejected first, with the valid keys of their node.
    """
    _reject_unknown_keys(cfg)
    try:
        obj = OmegaConf.to_object(cfg)
    except ConfigError as e:
        raise InvalidConfig(str(e)) from e
    except OmegaConfBaseException as e:  # a ConfigError raised inside, a missing value (???), an interpolation
        raise InvalidConfig(explain_config_error(e, [])) from e
    except (TypeError, ValueError) as e:
        raise InvalidConfig(str(e)) from e
    if not isinstance(obj, cls):
        raise InvalidConfig(f"expected a {cls.__name__} config, got {type(obj).__name__}")
    return obj


def to_run_config(cfg: DictConfig) -> RunConfig:
    """The typed run config; with ``train.init_from`` the model section is first replaced by the checkpoint's own
    (:func:`raymoe.train.pretrained.model_config`: explicit ``model.*`` overrides must agree with it)."""
    _apply_init_from(cfg)
    return to_object(cfg, RunConfig)


def _explicit_model_overrides(cfg: DictConfig) -> dict[str, Any]:
    """``{field: composed value}`` of the ``model.*`` settings the user gave: from Hydra's task overrides when a Hydra
    app runs (``model=<preset>`` makes every field of the preset explicit), else (compose API) the fields that differ
    from the preset named by ``model.name``."""
    from hydra.core.hydra_config import HydraConfig

    from raymoe.config import ModelConfig

    model = OmegaConf.to_container(cfg.model, resolve=True)
    if HydraConfig.initialized():
        keys = [_override_key(o) for o in HydraConfig.get().overrides.task]
        if "model" in keys:
            return model
        return {k[len("model."):].split(".")[0]: model.get(k[len("model."):].split(".")[0])
                for k in keys if k.startswith("model.")}
    if model.get("name") not in ModelConfig.preset_names():
        return {}
    preset = dataclasses.asdict(ModelConfig.preset(model["name"]))
    return {k: v for k, v in model.items() if k in preset and preset[k] != v}


def _apply_init_from(cfg: DictConfig) -> None:
    src = OmegaConf.select(cfg, "train.init_from")
    if not src:
        return
    from raymoe.train.pretrained import model_config

    try:
        TrainConfig(init_from=src)  # the URI's syntax first: no I/O on a malformed one
        model = model_config(src, _explicit_model_overrides(cfg))
    except ConfigError as e:
        raise InvalidConfig(str(e)) from e
    cfg.model = OmegaConf.structured(model)


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


# ---------------------------------------------------------------------------------------------- one-line errors
def _fields(cls: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def _unknown_key(full_key: str, valid: list[str]) -> str:
    """``unknown key 'train.stpes' (did you mean train.steps?); valid keys under 'train': ...``"""
    parent, _, leaf = full_key.rpartition(".")
    prefix = f"{parent}." if parent else ""
    msg = f"unknown key '{full_key}'"
    close = difflib.get_close_matches(leaf, valid, n=3, cutoff=0.6)
    if close:
        msg += f" (did you mean {' or '.join(prefix + c for c in close)}?)"
    if valid:
        where = f"under '{parent}'" if parent else "at the top level"
        msg += f"; valid keys {where}: {', '.join(sorted(valid))}"
    return msg


def _reject_unknown_keys(node: DictConfig, path: str = "") -> None:
    """Raise :class:`InvalidConfig` for a key that is not a field of its node's dataclass (recursively)."""
    valid = _fields(OmegaConf.get_type(node))
    for key in node.keys():
        full = f"{path}{key}"
        if valid and key not in valid:
            raise InvalidConfig(_unknown_key(full, valid))
        child = node._get_node(key)  # the node itself: no interpolation is resolved here
        if isinstance(child, DictConfig) and not (child._is_none() or child._is_missing()
                                                  or child._is_interpolation()):
            _reject_unknown_keys(child, full + ".")


def _type_name(tp: Any) -> str:
    """``int``, ``float``, ``bool (true/false)``, ``str``, ``list[str]``, ``int or null``, ``RopeScaling``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin in (list, tuple, typing.List, typing.Tuple) or tp in (list, tuple):
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin in (dict, typing.Dict) or tp is dict:
        return "mapping"
    if tp is bool:
        return "bool (true/false)"
    if dataclasses.is_dataclass(tp):
        return f"{tp.__name__} (a mapping with keys {', '.join(_fields(tp))})"
    return getattr(tp, "__name__", str(tp))


def _expected_type(object_type: Any, key: Any) -> Optional[str]:
    if not dataclasses.is_dataclass(object_type) or not isinstance(key, str):
        return None
    try:
        hints = typing.get_type_hints(object_type)
    except Exception:  # an unresolvable annotation: fall back to OmegaConf's wording
        return None
    return _type_name(hints[key]) if key in hints else None


def _override_key(override: str) -> str:
    """``+model@x=small`` -> ``model``; ``~train.steps`` -> ``train.steps``."""
    return override.lstrip("~+").split("=", 1)[0].split("@", 1)[0].strip()


def _find_override(key: str, overrides: list[str], context: str = "") -> Optional[str]:
    """The override that sets ``key`` or something below it (``model.nosuch.x=1`` fails at ``model.nosuch``).

    When several do (``train.steps=abc train.steps=1``), the one Hydra quotes in ``context`` (its error text) wins.
    """
    hits = [o for o in overrides if _override_key(o) == key or _override_key(o).startswith(key + ".")]
    quoted = [o for o in hits if o in context]
    return (quoted or hits or [None])[0]


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines()]
    return " ".join(ln for ln in lines if ln and not ln.startswith("See https://hydra.cc"))


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")


def _omegaconf_error(cause: OmegaConfBaseException, overrides: list[str], context: str) -> Optional[str]:
    full_key = getattr(cause, "full_key", None)
    if not full_key:
        return None
    key, object_type = getattr(cause, "key", None), getattr(cause, "object_type", None)
    override = _find_override(full_key, overrides, context)
    head = f"override {override!r}: " if override else ""
    text = _first_line(getattr(cause, "msg", None) or str(cause))
    if isinstance(cause, ConfigKeyError) or " not in '" in text:  # ConfigAttributeError is a ConfigKeyError too
        parent = getattr(cause, "parent_node", None)
        valid = _fields(object_type) or (list(parent.keys()) if isinstance(parent, DictConfig) else [])
        return head + _unknown_key(full_key, [str(k) for k in valid])
    if isinstance(cause, ConfigTypeError) and "deletion" in text:
        return head + f"'{full_key}' is a field of {getattr(object_type, '__name__', 'the schema')} and cannot be " \
                      f"deleted; override its value instead"
    if isinstance(cause, ValidationError):
        expected = _expected_type(object_type, key)
        if expected is None:
            return head + f"{full_key}: {text}"
        value = re.search(r"Value '(.*?)' (?:of type|is not)", text)  # the failing element of a sweep, say
        got = value.group(1) if value else (override.split("=", 1)[1] if override and "=" in override else None)
        if "is not Optional" in text:
            got = "null"
        return head + f"{full_key} expects {expected}" + (f", got {got!r}" if got is not None else f" ({text})")
    return head + f"{full_key}: {text}"


def explain_config_error(err: BaseException, overrides: list[str],
                         locate: Optional[Callable[[list[str]], Optional[str]]] = None) -> str:
    """One line (no prefix) for an error raised while composing or validating a config; names key and remedy.

    ``overrides`` are the command line's overrides; ``locate(overrides)``, if given, returns the one that fails on
    its own (used only for errors that carry no key).
    """
    if isinstance(err, InvalidConfig):
        return _one_line(err.msg)
    if isinstance(err, ConfigError):
        return _one_line(str(err))
    if isinstance(err, OverrideParseException):
        detail = _one_line(err.message.replace(f"Error parsing override '{err.override}'", ""))
        return (f"malformed override {err.override!r}: {detail}; expected key=value, +key=value (add), "
                f"++key=value (add or set), ~key (delete) or group=option")
    if isinstance(err, MissingConfigException):
        missing = getattr(err, "missing_cfg_file", None) or ""
        options = list(getattr(err, "options", None) or [])
        group, _, name = missing.rpartition("/")
        if group and options:
            override = _find_override(group, overrides, str(err))
            head = f"override {override!r}: " if override else ""
            close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
            hint = f" (did you mean {group}={close[0]}?)" if close else ""
            return head + f"config group '{group}' has no option '{name}'{hint}; available: {', '.join(options)}"
        return _one_line(str(err).split("Config search path:")[0])
    # Hydra wraps OmegaConf's errors (ConfigCompositionException from a ValidationError, ...); OmegaConf's own
    # errors and ConfigError can also arrive bare.
    chain: list[BaseException] = []
    e: Optional[BaseException] = err
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, (InvalidConfig, ConfigError)):
            return explain_config_error(e, overrides)
    context = " ".join(str(e) for e in chain)
    for e in chain:
        if isinstance(e, OmegaConfBaseException):
            line = _omegaconf_error(e, overrides, context)
            if line:
                return line
    if isinstance(err, ConfigCompositionException):
        return _one_line(str(err))
    # anything else raised while Hydra composed (e.g. setting a key below a null node): name the override if we can
    cand = [o for o in overrides if not _override_key(o).startswith(("hydra.", "hydra/"))]
    if len(cand) > 1 and locate is not None:
        try:
            found = locate(cand)
        except Exception:
            found = None
        cand = [found] if found else cand
    where = f"override {cand[0]!r}: " if len(cand) == 1 else (f"one of the overrides {cand}: " if cand else "")
    return f"{where}{type(err).__name__}: {_one_line(str(err))} (HYDRA_FULL_ERROR=1 shows the traceback)"


def _cli_overrides(argv: list[str]) -> list[str]:
    """The override arguments of a Hydra command line (flags such as ``--cfg job`` removed)."""
    try:
        from hydra._internal.utils import get_args_parser  # what hydra.main itself parses argv with

        args, _ = get_args_parser().parse_known_args(argv)
        return [str(o) for o in args.overrides]
    except BaseException:  # argparse exits on malformed flags; Hydra reports those itself
        return [a for a in argv if not a.startswith("-")]


def _locator(config_path: str, config_name: str, version_base: str) -> Callable[[list[str]], Optional[str]]:
    """``locate(overrides)``: the first override that fails to compose on its own (Hydra's compose API)."""

    def locate(overrides: list[str]) -> Optional[str]:
        if not config_path.startswith("pkg://"):
            return None
        from hydra import compose, initialize_config_module
        from hydra.core.global_hydra import GlobalHydra

        for override in overrides:
            GlobalHydra.instance().clear()
            try:
                with initialize_config_module(config_module=config_path[len("pkg://"):], version_base=version_base):
                    compose(config_name=config_name, overrides=[override])
            except Exception:
                return override
        return None

    return locate


def _fail(line: str) -> typing.NoReturn:
    print(f"invalid configuration: {line}", file=sys.stderr, flush=True)
    sys.exit(EXIT_INVALID)


_FULL_ERROR = "HYDRA_FULL_ERROR"


def _set_env(name: str, value: Optional[str]) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def hydra_app(config_name: str, config_path: str = "pkg://raymoe.conf",
              version_base: str = "1.3") -> Callable[[Callable[[DictConfig], Any]], Callable[..., Any]]:
    """``@hydra.main`` with one-line errors: any invalid override or :class:`InvalidConfig` exits with status 2.

    The decorated function is called with the composed config, exactly as under ``@hydra.main`` (calling the result
    with a config, ``main(cfg)``, runs the task directly as well). See the module docstring for how it works.
    """
    import hydra

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[..., Any]:
        user_value: list[Optional[str]] = [os.environ.get(_FULL_ERROR)]

        @functools.wraps(task)  # Hydra unwraps __wrapped__ to name the job after the task's module (train, schedule)
        def job(cfg: DictConfig) -> Any:
            hydra_value = os.environ.get(_FULL_ERROR)
            _set_env(_FULL_ERROR, user_value[0])  # the task (and anything it spawns) sees the caller's environment
            try:
                return task(cfg)
            except InvalidConfig as e:
                if user_value[0] == "1":
                    raise
                # exit here: past this point Hydra would print "Error executing job with overrides: ..." first
                _fail(explain_config_error(e, []))
            except Exception as e:
                try:
                    e.__raymoe_task_error__ = True  # type: ignore[attr-defined]  # not a composition error
                except Exception:
                    pass
                raise
            finally:
                _set_env(_FULL_ERROR, hydra_value)

        hydra_main = hydra.main(version_base=version_base, config_path=config_path, config_name=config_name)(job)

        @functools.wraps(task)
        def main(cfg: Optional[DictConfig] = None) -> Any:
            if cfg is not None:
                return task(cfg)
            user_value[0] = os.environ.get(_FULL_ERROR)
            _set_env(_FULL_ERROR, "1")  # Hydra re-raises instead of printing its own report and exiting 1
            try:
                return hydra_main()
            except Exception as e:
                if getattr(e, "__raymoe_task_error__", False) or user_value[0] == "1":
                    raise
                _fail(explain_config_error(e, _cli_overrides(sys.argv[1:]),
                                           _locator(config_path, config_name, version_base)))
            finally:
                _set_env(_FULL_ERROR, user_value[0])

        main.hydra_main = hydra_main  # type: ignore[attr-defined]
        return main

    return decorate
