"""Configs from YAML files and ``key=value`` overrides, validated into :class:`pipelines.config.TrainConfig`,
with errors that name the key (and a near miss); and the views of a config (MLflow params, the key table
of ``--help-config``: every key with the value the config runs with).

A config is YAML (see ``pipelines/configs/``), then overrides with dotted keys
(``optimization.lr=1e-4 method.name=sft``).
"""

from __future__ import annotations

import difflib
import json
import os
import types
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from pipelines.config import DEFAULT_METHOD, METHOD_CONFIGS, ConfigError, DataConfig, TrainConfig, flatten_tree

PACKAGED_CONFIGS = "pipelines.configs"
DEFAULT_CONFIG = "tiny"


def _format_validation_error(err: ValidationError, source: str, allowed: dict[tuple, list[str]]) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        section = tuple(p for p in loc[:-1] if not p.isdigit())
        method = None
        if loc[:1] == ("method",) and len(loc) > 2 and loc[1] in METHOD_CONFIGS:
            # pydantic puts the chosen method's tag in the path: method.sft.lam is the user's method.lam
            method, loc = loc[1], ("method",) + loc[2:]
        key = ".".join(loc) or "<root>"
        if e["type"] == "extra_forbidden":
            names = allowed.get(section, [])
            close = difflib.get_close_matches(loc[-1], names, n=1)
            hint = f" (did you mean '{'.'.join(loc[:-1] + (close[0],))}'?)" if close else ""
            what = f"unknown key for method '{method}' (its keys: {', '.join(names)})" if method else "unknown key"
            lines.append(f"  {key}: {what}{hint}")
        elif e["type"] == "union_tag_invalid" and loc == ("method",):
            got = (e.get("ctx") or {}).get("tag")
            lines.append(f"  method.name: unknown method {got!r} (choose from {', '.join(METHOD_CONFIGS)})")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            if not loc:  # a check across sections: its message names the keys
                lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
            else:
                lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _allowed_keys(model: type[BaseModel], prefix: tuple = ()) -> dict[tuple, list[str]]:
    """Section path (list indices left out) -> the keys that section accepts."""
    out = {prefix: list(model.model_fields)}
    for name, field in model.model_fields.items():
        sections = [
            c
            for c in (field.annotation, *getattr(field.annotation, "__args__", ()))
            if isinstance(c, type) and issubclass(c, BaseModel)
        ]
        if len(sections) > 1 and field.discriminator:  # one class per tag (the method): keys per tag, and all
            for section in sections:
                tag = section.model_fields[field.discriminator].default
                out.update(_allowed_keys(section, prefix + (name, tag)))
            out[prefix + (name,)] = list(dict.fromkeys(k for c in sections for k in c.model_fields))
        elif sections:
            out.update(_allowed_keys(sections[0], prefix + (name,)))
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[int(part)]
            continue
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, (dict, list)):
            raise ConfigError(f"override {dotted}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = nxt
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def _method_name_first(items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """``method.name`` is applied before the other overrides, so ``method.<option>`` is checked against the
    method the run will train with, wherever it stands on the command line."""
    return sorted(items, key=lambda kv: kv[0] != "method.name")


def _set_override(tree: dict, dotted: str, value: Any) -> None:
    """``_set_dotted``, except that switching ``method.name`` drops the options of the previous method
    that the new one does not have (a config's ``method.lam`` means nothing to ``method.name=sft``)."""
    method = tree.get("method")
    if dotted == "method.name" and isinstance(method, dict) and value in METHOD_CONFIGS:
        if method.get("name", DEFAULT_METHOD) != value:
            fields = METHOD_CONFIGS[value].model_fields
            tree["method"] = {k: v for k, v in method.items() if k in fields}
    if dotted in SOURCE_LISTS:
        value = sources_shorthand(value)
    _set_dotted(tree, dotted, value)


SOURCE_LISTS = ("data.train", "data.validation")
DEFAULT_HOLDOUT = 0.05  # of new training data, when a config's own validation set no longer applies


def sources_shorthand(value: Any) -> Any:
    """``my.jsonl``, ``a.jsonl,b.jsonl`` or a list of paths -> a list of sources (``[{path: ...}]``);
    full source mappings pass through."""
    if isinstance(value, str):
        return [{"path": p.strip()} for p in value.split(",") if p.strip()]
    if isinstance(value, list):
        return [{"path": v} if isinstance(v, str) else v for v in value]
    return value


def _hold_out_validation(tree: dict, override_keys: set[str]) -> str | None:
    """Training data replaced on the command line and validation not: the config's validation set
    belongs to its own data, so validation is held out of the new data instead.  Returns the note."""
    data = tree.get("data")
    if "data.train" not in override_keys or override_keys & {"data.validation", "data.validation_fraction"}:
        return None
    if not isinstance(data, dict) or not data.get("validation"):
        return None
    data["validation"] = []
    fraction = data.get("validation_fraction") or DEFAULT_HOLDOUT
    data["validation_fraction"] = fraction
    return (
        f"data.train is new and data.validation is not: validation is {fraction:.0%} of the new training data, held "
        "out (data.validation=PATH to choose it, or data.validation_fraction=0 for none)"
    )


def _parse_value(raw: str) -> Any:
    if raw == "":
        return None
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" as a string; people mean a number
            return float(value)
        except ValueError:
            pass
    return value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["a.b=1", "c=[x, y]"]`` -> ``[("a.b", 1), ("c", ["x", "y"])]`` (values parsed as YAML)."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. optimization.lr=1e-4)")
        key, raw = item.split("=", 1)
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        parsed.append((key.strip(), _parse_value(raw)))
    return parsed


def split_config_argument(items: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] key=value ...`` from the command line -> ``(CONFIG or None, overrides)``.

    The first item is the config (a path or a packaged name) unless it has an ``=``.
    """
    if items and "=" not in items[0]:
        return items[0], list(items[1:])
    return None, list(items)


def packaged_config_path(name: str) -> Path:
    """Path of a config shipped inside ``pipelines/configs`` (``tiny`` -> tiny.yaml)."""
    return Path(str(resources.files(PACKAGED_CONFIGS).joinpath(f"{name}.yaml")))


def packaged_config_names() -> list[str]:
    root = resources.files(PACKAGED_CONFIGS)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def resolve_data_paths(tree: dict, base_dir: str | os.PathLike) -> None:
    """Make relative data paths in a config tree absolute against ``base_dir``, in place.

    A YAML's paths are relative to that YAML's folder; ``key=value`` overrides are
    relative to the working directory of the person who typed them.  Either way they
    are made absolute once, at load time: Ray tasks and sweep trials run elsewhere.
    Hub ids (``hf:``), URIs and absolute paths are left alone, and so is a relative
    path that does not exist under ``base_dir`` (it may be meant for another base).
    """
    for split in ("train", "validation"):
        for src in (tree.get("data") or {}).get(split) or []:
            if isinstance(src, dict) and isinstance(src.get("path"), str):
                p = src["path"]
                if not (p.startswith("hf:") or "://" in p or os.path.isabs(p)):
                    candidate = Path(base_dir) / p
                    if candidate.exists() or any(ch in p for ch in "*?["):
                        src["path"] = os.path.abspath(candidate)


def resolve_cache_dir(tree: dict) -> None:
    """A local ``data.cache_dir`` becomes absolute against the working directory, in place:
    sweep trials and Ray tasks run elsewhere and must find the same cache."""
    data = tree.get("data")
    if isinstance(data, dict) and isinstance(data.get("cache_dir"), str) and "://" not in data["cache_dir"]:
        data["cache_dir"] = os.path.abspath(data["cache_dir"])


def read_yaml_mapping(file: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file: ``{}``); anything else is a ConfigError."""
    try:
        tree = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of sections")
    return tree


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a YAML config (default: the packaged ``tiny``), apply overrides, validate.

    ``path`` may also name a packaged config (``tiny``, ``mistral-7b-ift`` ...; ``ift configs`` lists them).
    """
    if path is None:
        file = packaged_config_path(DEFAULT_CONFIG)
    else:
        file = Path(path)
        if not file.exists() and (file.suffix == "" and packaged_config_path(str(path)).exists()):
            file = packaged_config_path(str(path))
        if not file.exists():
            raise ConfigError(
                f"config file '{path}' not found; packaged configs are: {', '.join(packaged_config_names())}"
            )
    tree = read_yaml_mapping(file)
    for split in ("train", "validation"):
        if isinstance(tree.get("data"), dict) and split in tree["data"]:
            tree["data"][split] = sources_shorthand(tree["data"][split])
    resolve_data_paths(tree, file.parent)
    parsed = _method_name_first(parse_overrides(overrides or []))
    for key, value in parsed:
        try:
            _set_override(tree, key, value)
        except (IndexError, ValueError, TypeError) as exc:
            raise ConfigError(f"override {key}: {exc}") from exc
    note = _hold_out_validation(tree, {key for key, _ in parsed})
    resolve_data_paths(tree, Path.cwd())
    if isinstance(tree.get("data"), dict):
        tree["data"].setdefault("cache_dir", DataConfig.model_fields["cache_dir"].default)
    resolve_cache_dir(tree)
    source = f"{file}" + (f" with overrides {' '.join(overrides)}" if overrides else "")
    try:
        cfg = TrainConfig.model_validate(tree, context={"config_name": file.stem})
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source, _allowed_keys(TrainConfig))) from None
    if note:
        cfg.notes.append(note)
    return cfg


def apply_overrides(cfg: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """A copy of ``cfg`` with dotted-key values set and re-validated (used by sweeps);
    relative data paths among them resolve against the working directory."""
    tree = cfg.model_dump(mode="python")
    for key, value in _method_name_first(list(values.items())):
        _set_override(tree, key, value)
    resolve_data_paths(tree, Path.cwd())
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, "overrides", _allowed_keys(TrainConfig))) from None


def flatten(cfg: TrainConfig) -> dict[str, Any]:
    """Dotted-key view of the resolved config (for MLflow params)."""
    return flatten_tree(cfg.model_dump(mode="json"))


# --------------------------------------------------------------------------- the key table (--help-config)

_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "at least"))


def _annotation_text(ann: Any) -> str:
    """A type as a person reads it: ``int or null``, ``one of cosine, linear, constant``, ``list of str``."""
    origin, args = get_origin(ann), get_args(ann)
    if ann is type(None):
        return "null"
    if origin is Literal:
        return ", ".join(map(str, args)) if len(args) == 1 else "one of " + ", ".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " or ".join(_annotation_text(a) for a in args)
    if origin is list:
        return f"list of {_annotation_text(args[0])}" if args else "list"
    if origin is tuple:
        return "[" + ", ".join(_annotation_text(a) for a in args) + "]"
    if origin is dict:
        return "mapping"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "section"
    return getattr(ann, "__name__", str(ann))


def _type_text(field: FieldInfo) -> str:
    """The field's type and bounds: ``float, >= 0, < 1``."""
    bounds = [f"{word} {getattr(m, attr)}" for m in field.metadata for attr, word in _BOUNDS if hasattr(m, attr)]
    return ", ".join([_annotation_text(field.annotation), *bounds])


def _value_text(value: Any) -> str:
    """A value as an override would write it: ``null``, ``true``, ``0.003``, ``[q_proj, v_proj]``."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if value is None or isinstance(value, (bool, list, tuple, dict)):
        plain = json.loads(json.dumps(value))  # tuples -> lists, which YAML writes in flow style
        return yaml.safe_dump(plain, default_flow_style=True, width=1 << 20).strip().removesuffix("\n...")
    if isinstance(value, str):
        return value or "''"
    return str(value)


def _default_text(field: FieldInfo) -> str:
    """A key of a section the config leaves unset: its default in parentheses, or ``required``."""
    if field.is_required():
        return "required"
    return f"({_value_text(field.get_default(call_default_factory=True))})"


def _sections(ann: Any) -> tuple[type[BaseModel] | None, type[BaseModel] | None]:
    """``(section, item)``: the section class of a ``Section`` / ``Section | None`` annotation, and the
    item class of a ``list[Section]`` one."""
    if get_origin(ann) is list:
        (item,) = get_args(ann) or (None,)
        return None, item if isinstance(item, type) and issubclass(item, BaseModel) else None
    for c in (ann, *get_args(ann)):
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c, None
    return None, None


def _key_rows(model: type[BaseModel], value: BaseModel | None, prefix: str) -> list[list[str]]:
    """One row per key of ``model`` (nested ones included); ``value`` None: an unset section (defaults)."""
    rows: list[list[str]] = []
    for name, field in model.model_fields.items():
        current = getattr(value, name) if value is not None else None
        rows += _field_rows(prefix + name, field, current, given=value is not None)
    return rows


def _field_rows(key: str, field: FieldInfo, current: Any, *, given: bool) -> list[list[str]]:
    help_text = field.description or ""
    if field.discriminator:
        return _method_rows(key, field, current)
    section, item = _sections(field.annotation)
    if section is not None:
        if get_origin(field.annotation) is None:  # a section that is always there: its keys only
            return _key_rows(section, current, key + ".")
        head = [key, _value_text(current) if given else _default_text(field), "section or null", help_text]
        return [head, *_key_rows(section, current if given else None, key + ".")]
    if item is not None:
        items = list(current or []) if given else []
        head = [key, f"{len(items)} item{'' if len(items) == 1 else 's'}", "list of sections", help_text]
        rows = [head]
        for i, element in enumerate(items):
            rows += _key_rows(item, element, f"{key}.{i}.")
        return rows + (_key_rows(item, None, f"{key}.<i>.") if not items else [])
    return [[key, _value_text(current) if given else _default_text(field), _type_text(field), help_text]]


def _method_rows(key: str, field: FieldInfo, method: Any) -> list[list[str]]:
    """The method's name (every method allowed) and the keys of the config's method only."""
    tag = field.discriminator
    cls = type(method)
    about = (cls.__doc__ or "").strip().split("\n")[0]
    others = ", ".join(n for n in METHOD_CONFIGS if n != method.name)
    help_text = f"{field.description} {method.name}: {about} (keys of {others}: method.name=NAME --help-config)"
    rows = [[f"{key}.{tag}", _value_text(getattr(method, tag)), "one of " + ", ".join(METHOD_CONFIGS), help_text]]
    for name, sub in cls.model_fields.items():
        if name != tag:
            rows.append([f"{key}.{name}", _value_text(getattr(method, name)), _type_text(sub), sub.description or ""])
    return rows


def describe_config(cfg: TrainConfig, title: str | None = None, *, width: int | None = None) -> str:
    """Every key of ``cfg`` (nested ones, and those of its method) with the value it runs with, the type
    and allowed values, and the help text, as a table (``ift train [CONFIG] [key=value ...] --help-config``).

    A key of a section the config leaves unset (``model.lora``) shows its default in parentheses.
    """
    from pipelines.tables import render_table, table_width

    rows: list[list[str] | None] = []
    for name, field in TrainConfig.model_fields.items():
        if rows:
            rows.append(None)  # a blank line between sections
        rows += _field_rows(name, field, getattr(cfg, name), given=True)
    width = width or table_width()
    columns = _key_table_columns(rows, width)
    if len(columns) == 3:  # narrow: the type opens the help
        rows = [None if r is None else [r[0], r[1], f"{r[2]}: {r[3]}" if r[3] else r[2]] for r in rows]
    return render_table(columns, rows, title, width=width)


def _key_table_columns(rows: list[list[str] | None], width: int) -> list[Any]:
    """Fixed column widths: keys whole; values and types at most a quarter of what is left each (at least 16
    and 20), wrapped beyond; the help the rest.  Where that leaves the help under 26 (a terminal under ~120
    columns), three columns: the type goes first in the help's.  Nothing is cut off."""
    from rich.table import Column

    def widest(i: int, cap: int) -> int:
        return min(cap, max(len(r[i]) for r in rows if r is not None))

    key = widest(0, 60)
    room = width - key - 9  # three column gaps of 3
    value, kind = widest(1, max(16, room // 4)), widest(2, max(20, room // 4))
    if room - value - kind < 26:
        value = widest(1, 16)
        return [
            Column("key", width=key, no_wrap=True),
            Column("value", width=value, overflow="fold"),
            Column("type: help", width=max(16, room + 3 - value), overflow="fold"),
        ]
    return [
        Column("key", width=key, no_wrap=True),
        Column("value", width=value, overflow="fold"),
        Column("type", width=kind, overflow="fold"),
        Column("help", width=room - value - kind, overflow="fold"),
    ]
