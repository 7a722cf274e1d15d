"""Command-line conventions shared by `npp_jax.main`, `npp_jax.convert` and `npp_jax.npy_codes`
(absl flags).

A bad command line or config ends in one line on stderr, `error: ...`, naming the file, flag or key
and what was expected, and exit status 2; `--traceback` (where defined) shows the full traceback
instead.

absl and ml_collections report config problems as tracebacks (a missing file only at the config's
first use, an unknown key as a KeyError inside flag parsing). So when parsing fails, or yields no
config, the config file is loaded once more here, step by step, to say which step failed: the happy
path runs absl's code unchanged.
"""

import difflib
import importlib.util
import logging as pylogging
import os
import re
import sys
import traceback
from typing import Any, Callable, NoReturn, Sequence

from absl import flags
from absl import logging
from ml_collections import config_dict
from ml_collections import config_flags
from ml_collections.config_flags import config_path

EXIT_BAD_INPUT = 2
# Errors that bad input or the environment (a path, a full disk, a permission) cause, and a run that
# diverged (the loop's one-line FloatingPointError names the last good checkpoint); anything else is
# a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError)
_EXAMPLE = "configs/b.py"


class ConfigError(ValueError):
  """A config file or override that cannot be used."""


def define_config(
  flag_values: flags.FlagValues = flags.FLAGS,
  sys_argv: Sequence[str] | None = None,
  help_string: str = "A config file (configs/*.py), optionally FILE:ARG for get_config(ARG).",
) -> None:
  """--config=FILE[:ARG] plus --config.a.b=VALUE overrides, locked: a misspelled key is an error."""
  config_flags.DEFINE_config_file(
    "config",
    None,
    help_string,
    flag_values=flag_values,
    lock_config=True,
    sys_argv=None if sys_argv is None else list(sys_argv),
  )


def parse(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """Parses argv into flag_values; ConfigError (one line) names the bad flag, config file or key."""
  argv = list(argv)
  try:
    rest = flag_values(argv)
  except Exception as e:  # absl, ml_collections and the config file itself raise many types.
    raise ConfigError(explain(e, argv)) from None
  if "config" in flag_values and flag_values["config"].value is not None:
    if not isinstance(flag_values["config"].value, config_dict.ConfigDict):
      # config_flags defers a file it could not load (a missing file) to the config's first use.
      spec = _config_spec(argv)
      problem, _ = load_config_file(spec) if spec is not None else (None, None)
      raise ConfigError(
        problem
        or f"--config={spec!r} gave no ConfigDict; expected a config file such as {_EXAMPLE}"
      )
  return rest


def absl_flags_parser(argv: Sequence[str]) -> list[str]:
  """For `app.run(main, flags_parser=cli.absl_flags_parser)`: the global FLAGS, one-line errors."""
  try:
    return parse(argv, flags.FLAGS)
  except ConfigError as e:
    fail(e)


def report(error: BaseException | str) -> int:
  """Prints `error: <one line>` as the last line on stderr; returns EXIT_BAD_INPUT."""
  text = str(error) if not isinstance(error, OSError) else _os_error(error)
  line = " ".join(text.split()) or type(error).__name__
  logging.flush()  # Pending log lines go first: the error must be the last line.
  sys.stdout.flush()
  print(f"error: {line}", file=sys.stderr, flush=True)
  return EXIT_BAD_INPUT


def fail(error: BaseException | str) -> NoReturn:
  code = report(error)
  # The process only shuts down from here: what libraries log while it does (asyncio's "Task
  # exception was never retrieved" for orbax's abandoned writes) must not follow the error line.
  pylogging.disable(pylogging.CRITICAL)
  sys.exit(code)


def run(fn: Callable[[], Any], show_traceback: bool = False) -> Any:
  """Calls fn(); USER_ERRORS end in `fail`. Without show_traceback, the tracebacks that libraries
  log from their background threads (orbax's async saves) shrink to their one-line message: the
  error that stops the run says the cause once, last."""
  if not show_traceback:
    for name in ("absl", "asyncio"):
      pylogging.getLogger(name).addFilter(_drop_library_tracebacks)
    sys.excepthook = _quiet_closed_loop(sys.excepthook)
    sys.unraisablehook = _quiet_closed_loop_unraisable(sys.unraisablehook)
  try:
    return fn()
  except USER_ERRORS as e:
    if show_traceback:
      raise
    fail(e)


def _quiet_closed_loop(hook):
  """tensorstore reports each write still in flight when orbax's save fails as "RuntimeError: Event
  loop is closed" (orbax closed the save's event loop at the first error), through sys.excepthook or
  sys.unraisablehook: a traceback per write, none of them the cause. Every other exception reaches
  the previous hook."""

  def quiet(kind, value, tb):
    if not _closed_loop(value):
      hook(kind, value, tb)

  return quiet


def _quiet_closed_loop_unraisable(hook):
  def quiet(unraisable):
    if not _closed_loop(unraisable.exc_value):
      hook(unraisable)

  return quiet


def _closed_loop(value) -> bool:
  return type(value) is RuntimeError and str(value) == "Event loop is closed"


def _drop_library_tracebacks(record: pylogging.LogRecord) -> bool:
  # Library code only (site-packages, or asyncio reporting a library's task); the message line
  # stays.
  if record.exc_info and (
    record.name == "asyncio" or f"{os.sep}site-packages{os.sep}" in record.pathname
  ):
    record.exc_info, record.exc_text = None, None
  return True


def _os_error(e: OSError) -> str:
  # OSError's str() is "[Errno 28] No space left on device: 'path'"; say it as a sentence.
  if e.strerror and e.filename:
    return f"{e.filename}: {e.strerror} ({type(e).__name__})"
  return str(e) or type(e).__name__


# ---------------------------------------------------------------------------------------- diagnosis


def explain(error: Exception, argv: Sequence[str]) -> str:
  """One line for a failed parse: the config file's problem, an unknown or mistyped key, or absl's
  own."""
  spec = _config_spec(argv)
  config = None
  if spec is not None:
    problem, config = load_config_file(spec)
    if problem:
      return problem
  if config is not None:
    for path, value in _overrides(argv):
      problem = unknown_key(config, path, spec)
      if problem:
        return problem
    failed = re.match(r"flag --config\.([\w.\[\]]+)=(.*?): (.*)", str(error), re.S)
    if failed:
      return wrong_type(config, failed.group(1), failed.group(2), failed.group(3), spec)
  lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


def _config_spec(argv: Sequence[str]) -> str | None:
  spec = None
  for i, arg in enumerate(argv):
    if arg.startswith(("--config=", "-config=")):
      spec = arg.split("=", 1)[1]
    elif arg in ("--config", "-config") and i + 1 < len(argv):
      spec = argv[i + 1]
  return spec


def _overrides(argv: Sequence[str]) -> list[tuple[str, str | None]]:
  out = []
  for arg in argv:
    m = re.match(r"-{1,2}(?:no)?config\.([^=]+)(?:=(.*))?$", arg)
    if m:
      out.append((m.group(1), m.group(2)))
  return out


def load_config_file(spec: str) -> tuple[str | None, Any]:
  """(problem, config): loads FILE[:ARG] as config_flags does, saying in one line which step
  failed."""
  path, _, arg = spec.partition(":")
  call = f"get_config({arg!r})" if arg else "get_config()"
  if not path:
    return f"--config is empty; expected a config file such as {_EXAMPLE}", None
  if not os.path.exists(path):
    return (
      f"--config={path!r}: no such file (from {os.getcwd()}); expected a config file such as "
      f"{_EXAMPLE}"
    ), None
  if not os.path.isfile(path):
    return f"--config={path!r} is a directory; expected a config file such as {_EXAMPLE}", None
  try:
    source = open(path, "rb").read()
    code = compile(source, path, "exec")
  except SyntaxError as e:
    return f"config file {path}, line {e.lineno}: {e.msg}; expected a Python file", None
  except (OSError, ValueError) as e:
    return f"config file {path} cannot be read: {e}", None
  spec_ = importlib.util.spec_from_file_location("config_config", path)
  module = importlib.util.module_from_spec(spec_)
  try:
    exec(code, module.__dict__)  # pylint: disable=exec-used
  except Exception as e:  # The file's own code failed: say where.
    return f"config file {path} raised {_where(e, path)}", None
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    return (
      f"config file {path} defines no get_config(); expected a function get_config(arg=None) that "
      "returns an ml_collections.ConfigDict"
    ), None
  try:
    config = get_config(*([arg] if arg else []))
  except Exception as e:
    return f"config file {path}: {call} raised {_where(e, path)}", None
  if not isinstance(config, config_dict.ConfigDict):
    return (
      f"config file {path}: {call} returned {type(config).__name__}; expected an "
      "ml_collections.ConfigDict"
    ), None
  return None, config


def _where(e: Exception, path: str) -> str:
  lines = [
    f.lineno
    for f in traceback.extract_tb(e.__traceback__)
    if os.path.abspath(f.filename) == os.path.abspath(path)
  ]
  first = str(e).strip().splitlines()[0] if str(e).strip() else ""
  return f"{type(e).__name__}{': ' + first if first else ''}" + (
    f" (line {lines[-1]})" if lines else ""
  )


def _keys(node: config_dict.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for key, value in node.items():
    out.append(prefix + key)
    if isinstance(value, config_dict.ConfigDict):
      out.extend(_keys(value, f"{prefix}{key}."))
  return out


def unknown_key(config: config_dict.ConfigDict, path: str, spec: str | None) -> str | None:
  """None if `path` names a field of config; else one line with the closest existing key."""
  node = config
  for part in path.split("."):
    name = re.sub(r"\[.*$", "", part)
    if not isinstance(node, config_dict.ConfigDict):
      return None  # Indexing into a value: config_flags' own message says more.
    if name not in node:
      keys = _keys(config)
      close = difflib.get_close_matches(path, keys, n=1, cutoff=0.5)
      hint = (
        f"did you mean --config.{close[0]}?" if close else "expected an existing key of the config"
      )
      return (
        f"--config.{path}: the config{f' ({spec})' if spec else ''} has no key {path!r}; {hint}"
      )
    node = node[name]
  return None


def wrong_type(config, path: str, value: str, reason: str, spec: str | None) -> str:
  try:
    want = config_path.get_type(path, config)
    current = config_path.get_value(path, config)
    expected = f"expected {getattr(want, '__name__', want)} (the config's value is {current!r})"
  except Exception:  # An unusual path (indexing): absl's reason is all there is.
    expected = "expected a value of the field's type"
  reason = " ".join(reason.split())
  return f"--config.{path}={value!r}: {reason}; {expected}"
