"""The command line: one-line errors for bad input (the launch scripts: test_launch.py)."""

import pytest
from support.cli import run_main


@pytest.mark.parametrize(
  "args, message",
  [
    (
      ["--config=configs/tiny.py", "--config.model.name=GPT-Z"],
      "error: unknown model.name='GPT-Z'",
    ),
    (["--config=configs/tiny.py"], "error: data.path is empty"),
    (
      ["--config=configs/tiny.py", "--config.data.path=/nonexistent"],
      "error: no code data set at /nonexistent",
    ),
    (
      ["--config=configs/b.py:bogus"],
      "unknown config argument 'bogus'; expected none or one of 'runlocal'",
    ),
    (
      ["--config=configs/demo.py:bogus"],
      "unknown config argument 'bogus'; expected none or one of 'smoke'",
    ),
    (["--config=configs/tiny.py:x"], "unknown config argument 'x'; expected none"),
    (["--config=configs/nope.py"], "configs/nope.py"),
  ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
  workdir = tmp_path / "run"
  out = run_main(*args, f"--workdir={workdir}")
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error:") and message in last, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  assert not workdir.exists()
