"""Typed configs: nested frozen dataclasses built from dicts (YAML files, `--section.key=value`
overrides, notebook keyword arguments), every key checked against a field and every value coerced
to the field's type; unknown keys and unreadable values are errors naming the key.

The entry points (`train/cli.py`) and the notebook API (`api/`) share this, and the run
directory helpers below.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import types
import typing
from pathlib import Path
from typing import Any


def _coerce(value: Any, tp, where: str):
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if origin in (typing.Union, types.UnionType):
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
      if type(None) in args:
        return None
    errors = []
    for a in args:
      if a is type(None):
        continue
      try:
        return _coerce(value, a, where)
      except (TypeError, ValueError) as e:
        errors.append(str(e))
    raise ValueError(f"{where}: cannot read {value!r} as {tp}: {errors}")
  if origin is typing.Literal:
    if value not in args:
      raise ValueError(f"{where}: {value!r} is not one of {list(args)}")
    return value
  if origin in (tuple, list):
    if isinstance(value, str):
      # "16,32", "[16, 32]" and "[f1]" alike: brackets optional, items comma-separated.
      text = value.strip()
      if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
      value = [v.strip() for v in text.split(",") if v.strip() != ""]
    inner = args[0] if args else str
    return origin(_coerce(v, inner, where) for v in value)
  if tp is bool:
    if isinstance(value, str):
      if value.lower() in ("1", "true", "yes", "on"):
        return True
      if value.lower() in ("0", "false", "no", "off"):
        return False
      raise ValueError(f"{where}: {value!r} is not a boolean")
    return bool(value)
  if tp in (int, float):
    try:
      number = float(value) if isinstance(value, str) else value
      ok = not isinstance(value, bool) and (tp is float or float(number).is_integer())
    except (TypeError, ValueError):
      ok = False
    if not ok:  # 8.5 for an int used to become 8
      raise ValueError(f"{where}: {value!r} is not {'an integer' if tp is int else 'a number'}")
    return tp(number)
  if tp is str:
    return str(value)
  if dataclasses.is_dataclass(tp):
    if not isinstance(value, dict):
      raise ValueError(f"{where}: expected a mapping")
    return build(tp, value, where)
  return value


def build(cls, data: dict, where: str = ""):
  """Builds dataclass `cls` from a nested dict, type-checking every key."""
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - set(fields))
  if unknown:
    raise KeyError(f"unknown config key(s) {[f'{where}{k}' for k in unknown]}; "
                   f"known under '{where or '<top>'}': {sorted(fields)}")
  kw = {k: _coerce(v, hints[k], f"{where}{k}") for k, v in data.items()}
  return cls(**kw)


def merge(cfg, overrides: dict[str, Any], where: str = ""):
  """Applies {"a.b": value} overrides to a dataclass instance."""
  nested: dict[str, Any] = {}
  for key, value in overrides.items():
    head, _, rest = key.partition(".")
    nested.setdefault(head, {} if rest else None)
    if rest:
      if nested[head] is None:
        raise KeyError(f"config key {where}{head} set both as a value and as a section")
      nested[head][rest] = value
    else:
      nested[head] = value
  fields = {f.name for f in dataclasses.fields(cfg)}
  hints = typing.get_type_hints(type(cfg))
  changes = {}
  for head, value in nested.items():
    if head not in fields:
      raise KeyError(f"unknown config key '{where}{head}'; known: {sorted(fields)}")
    current = getattr(cfg, head)
    if dataclasses.is_dataclass(current) and isinstance(value, dict):
      changes[head] = merge(current, value, f"{where}{head}.")
    else:
      changes[head] = _coerce(value, hints[head], f"{where}{head}")
  return dataclasses.replace(cfg, **changes)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _comments(cls) -> dict[str, str]:
  """Each field's comment in `cls`'s source: the `# ...` lines right above it, or the one at
  the end of its line."""
  try:
    lines = inspect.getsource(cls).splitlines()
  except (OSError, TypeError):
    return {}
  out, above = {}, []
  for line in lines:
    text = line.strip()
    if text.startswith("#"):
      above.append(text.lstrip("# "))
      continue
    m = re.match(r"(\w+)\s*:[^=]*(=.*)?$", text)
    if m and not text.startswith(("def ", "class ", "@")):
      trailing = text.split("  # ", 1)[1] if "  # " in text else ""
      out[m.group(1)] = " ".join(above) or trailing
    above = []
  return out


def _type_name(tp) -> str:
  return re.sub(r"typing\.|<class '(\w+)'>", lambda m: m.group(1) or "", str(tp)) \
      if not isinstance(tp, type) else tp.__name__


def describe(cfg, where: str = "") -> list[str]:
  """One line per override key of a config instance: `--key=<type> (default: value)  meaning`."""
  hints, notes, out = typing.get_type_hints(type(cfg)), _comments(type(cfg)), []
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    if dataclasses.is_dataclass(value):
      out += describe(value, f"{where}{f.name}.")
      continue
    note = notes.get(f.name, "")
    out.append(f"  --{where}{f.name}=<{_type_name(hints[f.name])}>  (default: {value!r})"
               + (f"\n      {note}" if note else ""))
  return out


def to_dict(cfg) -> dict:
  return dataclasses.asdict(cfg)


# --- the run directory (shared by the entry points) ------------------------------------------

def start_run(cfg, loop) -> Path:
  """The run directory, checked before anything is written (`trainer.prepare_output_dir`: an
  earlier run there needs --loop.resume or --loop.overwrite), with the config saved in it."""
  from minilm_jax import trainer
  out_dir = trainer.prepare_output_dir(loop)
  save_config(out_dir, cfg, loop.resume)
  return out_dir


def save_config(out_dir: Path, cfg, resume: bool) -> None:
  """Writes config.json (process 0 only). A resume keeps the config.json its checkpoints were
  written with (a resume that fails on a mismatched config leaves the directory as it was) and
  records its own as config.resume.json."""
  import jax
  path = Path(out_dir) / "config.json"
  if resume and path.exists():
    path = path.with_name("config.resume.json")
  if jax.process_index() == 0:
    path.write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


def update_metrics(out_dir: Path, summary: dict) -> None:
  """Merges `summary` into metrics.json (process 0 only; the trainer wrote the eval records)."""
  import jax
  if jax.process_index() != 0:
    return
  path = Path(out_dir) / "metrics.json"
  merged = json.loads(path.read_text()) if path.exists() else {}
  merged.update(summary)
  path.write_text(json.dumps(merged, indent=2, default=float) + "\n")
