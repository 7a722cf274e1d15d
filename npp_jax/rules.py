"""The vocabulary of setting rules: what a field must be, and the one message when it is not.

A rule is (what it expects, test). Every settings class (one per config section, next to the code
that uses the section) checks its fields with these in `__post_init__`, so the command line, a
library entry point and a settings object built directly in Python see the same rule and the same
one-line `ValueError`: "FIELD=VALUE; expected WHAT".
"""

import dataclasses
import numbers
import re
from typing import Any, Mapping

import jax.numpy as jnp
import ml_collections

# Compute and parameter dtypes a config may name, and the types they stand for.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DTYPE_NAMES = tuple(DTYPES)


def is_int(v) -> bool:
  """An integer that is not a bool (True is not a count), numpy integers included."""
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_num(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


POSITIVE_INT = ("a positive integer", lambda v: is_int(v) and v >= 1)
COUNT = ("an integer >= 0", lambda v: is_int(v) and v >= 0)
INT = ("an integer", is_int)
POSITIVE = ("a positive number", lambda v: is_num(v) and v > 0)
NON_NEGATIVE = ("a number >= 0", lambda v: is_num(v) and v >= 0)
FRACTION = ("a number in [0, 1)", lambda v: is_num(v) and 0 <= v < 1)
OPEN_FRACTION = ("a number in (0, 1)", lambda v: is_num(v) and 0 < v < 1)
CLOSED_FRACTION = ("a number in [0, 1]", lambda v: is_num(v) and 0 <= v <= 1)
BOOL = ("True or False", lambda v: isinstance(v, bool))
TEXT = ("a string", lambda v: isinstance(v, str))
NON_EMPTY = ("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")
# TFDS parses '+', '[' and '%' as split arithmetic, which no job here asks for.
SPLIT = (
  "a plain split name of letters, digits and '_' (e.g. 'train'; no TFDS split arithmetic)",
  lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_]+", v) is not None,
)
KEEP = ("a positive integer (checkpoints to keep)", POSITIVE_INT[1])
PAIR = (
  "two positive integers (rows, cols)",
  lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(is_int(x) and x >= 1 for x in v),
)


def one_of(*choices):
  return (f"one of {list(choices)}", lambda v: v in choices)


def optional(rule):
  return (f"None or {rule[0]}", lambda v: v is None or rule[1](v))


DTYPE = one_of(*DTYPE_NAMES)


def dtype_name(dtype) -> str | None:
  """'float32' for jnp.float32 (or for its name); None for anything that is no dtype."""
  try:
    return jnp.dtype(dtype).name
  except TypeError:
    return None


def get(config: ml_collections.ConfigDict, field: str) -> Any:
  """config's value at a dotted field; a one-line error naming the section when it is missing."""
  node = config
  for part in field.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      section = field.rsplit(".", 1)[0]
      raise ValueError(
        f"the config has no field {field!r}; expected the `{section}` section of "
        "npp_jax.config_lib (start config files from config_lib.base_config())"
      )
    node = node[part]
  return node


def check(field: str, value: Any, rule) -> Any:
  """value, if it passes rule; else ValueError "FIELD=VALUE; expected WHAT"."""
  what, test = rule
  if not test(value):
    raise ValueError(f"{field}={value!r}; expected {what}")
  return value


def expect(config, field: str, rule) -> Any:
  """The config's value at field, checked against rule."""
  return check(field, get(config, field), rule)


def check_fields(settings, section: str, table: Mapping[str, Any]) -> None:
  """Each field of a settings object named in table against its rule ("section.field" in errors)."""
  for name, rule in table.items():
    check(f"{section}.{name}", getattr(settings, name), rule)


def section(config, name: str, cls, **given) -> dict:
  """{field: config.name.field} for every field of the dataclass cls not in `given`, plus `given`:
  the keyword arguments of `cls(...)` in a `from_config`."""
  fields = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in given]
  return {**{f: get(config, f"{name}.{f}") for f in fields}, **given}


def positive_int(value: Any, name: str) -> int:
  """An int >= 1 (numpy ints too), for a library argument that is no config field."""
  return int(check(name, value, POSITIVE_INT))


def split_name(split: Any, field: str = "split") -> str:
  return check(field, split, SPLIT)
