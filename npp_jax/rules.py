"""The vocabulary of setting rules: what a field must be, and the one message when it is not.

A rule is (what it expects, test). Every settings class (one per config section, next to the code that
uses the section) checks its fields with these, so the CLI's preflight and a library caller see the same
rule and the same one-line `ValueError`: "FIELD=VALUE; expected WHAT".
"""

import numbers
from typing import Any

import ml_collections

DTYPE_NAMES = ("float32", "bfloat16", "float16")


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
SIZE = (
  "a positive integer (None only with a released model.name)",
  lambda v: v is None or (is_int(v) and v >= 1),
)


def one_of(*choices):
  return (f"one of {list(choices)}", lambda v: v in choices)


def optional(rule):
  return (f"None or {rule[0]}", lambda v: v is None or rule[1](v))


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
