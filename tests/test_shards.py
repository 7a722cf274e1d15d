"""npp_jax.shards on its own: shard names, the settings record and its check, resume of only the
missing shards, atomic writes, and (real processes) every process running process 0's shards and
reading every shard even where its own folder lacks some."""

import inspect
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from support.cli import free_port
from support.cli import multiprocess_env
from support.paths import ROOT

from npp_jax import shards


def arrays(i: int, n: int) -> dict:
  """Shard i's content: random, never zeros, two dtypes (what a job writes)."""
  rng = np.random.default_rng(100 + i)
  return {"x": rng.normal(size=(n, 3)).astype(np.float32), "y": rng.integers(1, 9, n)}


def test_spans_and_the_names_on_disk(tmp_path):
  store = shards.Shards(tmp_path, 10, 8)
  assert store.spans == [(0, 8), (8, 10)] and store.size([0, 1]) == 10 and store.size([1]) == 2
  # The sampling job's and the features' names (span) and the extraction's (index): runs resume.
  assert [store.path(i).name for i in range(2)] == ["shard_00-08.npz", "shard_08-10.npz"]
  assert shards.Shards(tmp_path, 100, 50).path(1).name == "shard_050-100.npz"
  by_index = shards.Shards(tmp_path, 500, 64, "settings.json", by_index=True)
  assert len(by_index.spans) == 8 and by_index.spans[-1] == (448, 500)
  assert by_index.path(7).name == "shard_000007.npz"
  assert store.path(0).parent == tmp_path


def test_start_writes_resumes_only_the_missing_shards_bit_exact(tmp_path, caplog):
  folder = tmp_path / "job"
  settings = {"seed": 0, "what": "test"}
  store = shards.Shards(folder, 10, 4)
  store.check_settings(settings, "things", "expected the same")  # No folder yet: a fresh job.
  todo = store.start(settings, "Resuming: %d of %d things already in %s.")
  assert todo == [0, 1, 2]
  assert json.loads((folder / "meta.json").read_text()) == settings
  want = {i: arrays(i, b - a) for i, (a, b) in enumerate(store.spans)}
  kept = store.write(todo, (want[i] for i in todo), "test", keep=True)
  assert sorted(kept) == [0, 1, 2] and not list(folder.glob("*.tmp"))
  for i in range(3):
    for k in ("x", "y"):
      np.testing.assert_array_equal(store.read(i)[k], want[i][k])
  assert store.write(todo[:1], iter([want[0]]), "test") == {}  # keep=False keeps nothing.

  # A lost shard: only it runs again; the others are read from disk, bit for bit.
  os.remove(folder / "shard_04-08.npz")
  stamp = (folder / "shard_00-04.npz").stat().st_mtime_ns
  caplog.set_level(logging.INFO)
  store = shards.Shards(folder, 10, 4)
  todo = store.start(settings, "Resuming: %d of %d things already in %s.")
  assert todo == [1]
  assert f"Resuming: 6 of 10 things already in {folder}." in caplog.text
  fresh = store.write(todo, (want[i] for i in todo), "test", keep=True)
  got = store.read_all(fresh)
  assert got[1] is fresh[1]  # Computed in this run: not read back.
  for i in range(3):
    for k in ("x", "y"):
      np.testing.assert_array_equal(got[i][k], want[i][k])
      assert got[i][k].dtype == want[i][k].dtype
  assert (folder / "shard_00-04.npz").stat().st_mtime_ns == stamp  # Finished shards not rewritten.


def test_a_crash_keeps_the_finished_shards_and_leaves_no_partial_file(tmp_path):
  store = shards.Shards(tmp_path, 12, 4)
  todo = store.start({"a": 1})

  def crash_in_the_second():
    yield arrays(0, 4)
    raise RuntimeError("killed")

  with pytest.raises(RuntimeError, match="killed"):
    store.write(todo, crash_in_the_second(), "test")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "shard_00-04.npz"]
  assert store.start({"a": 1}) == [1, 2]


def test_other_settings_are_refused_naming_the_first_difference(tmp_path):
  store = shards.Shards(tmp_path, 4, 4, "settings.json", by_index=True)
  store.start({"seed": 0, "size": 8})
  store.check_settings({"seed": 0, "size": 8}, "shards", "expected the same")
  with pytest.raises(ValueError) as e:
    store.check_settings({"seed": 1, "size": 8}, "shards", "expected the same, or delete it")
  assert str(e.value) == (
    f"{tmp_path} holds shards of other settings (seed: 0 there, 1 now); "
    "expected the same, or delete it"
  )
  with pytest.raises(FileNotFoundError):  # One process: a shard lost after the run is an error.
    store.read_all({})


# -------------------------------------------------------------------------------- several processes

_SCRIPT = """
import json, sys
import jax
import numpy as np
from npp_jax import shards

{arrays}

pid = int(sys.argv[1])
jax.distributed.initialize({address!r}, 2, pid)
from jax.experimental import multihost_utils

store = shards.Shards({root!r} + f"/p{{pid}}", 40, 8)
store.check_settings({{"run": 1}}, "test shards", "expected the same")
todo = store.start({{"run": 1}})


def results():
  for i in todo:  # Each shard a collective: a process running other shards would hang or mix.
    both = multihost_utils.process_allgather(np.array([pid, i], np.int32))
    assert (both[:, 1] == i).all(), both
    a, b = store.spans[i]
    yield arrays(i, b - a)


fresh = store.write(todo, results(), "test", keep=True)
store.finish("test_shards")
got = store.read_all(fresh)
print("RESULT " + json.dumps({{"todo": todo, "x": [g["x"].tolist() for g in got],
                               "y": [g["y"].tolist() for g in got]}}))
"""


def _fill(store, shard_ids):
  store.start({"run": 1})
  store.write(list(shard_ids), (arrays(i, 8) for i in shard_ids), "fill")


@pytest.mark.timeout(200)
def test_two_processes_run_process_0s_shards_and_read_every_shard(tmp_path):
  """Per-process folders that disagree: process 0 has shards {0, 2}, process 1 {1, 2, 4}. Both run
  process 0's missing shards {1, 3, 4}; process 1 gets shard 0 (its folder lacks it) from process
  0; process 0 alone writes."""
  _fill(shards.Shards(tmp_path / "p0", 40, 8), [0, 2])
  _fill(shards.Shards(tmp_path / "p1", 40, 8), [1, 2, 4])
  before = sorted(p.name for p in (tmp_path / "p1").iterdir())
  script = tmp_path / "run.py"
  script.write_text(
    _SCRIPT.format(
      arrays=inspect.getsource(arrays), address=f"127.0.0.1:{free_port()}", root=str(tmp_path)
    )
  )
  procs = [
    subprocess.Popen(
      [sys.executable, str(script), str(i)],
      cwd=ROOT,
      env=multiprocess_env(2),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  try:
    outs = [p.communicate(timeout=150)[0] for p in procs]
  except subprocess.TimeoutExpired:
    pytest.fail("the processes did not finish in 150 s (deadlock?)")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
  results = [json.loads(o.split("RESULT ", 1)[1].splitlines()[0]) for o in outs]
  for r in results:
    assert r["todo"] == [1, 3, 4]
    for i in range(5):
      np.testing.assert_array_equal(np.float32(r["x"][i]), arrays(i, 8)["x"])
      np.testing.assert_array_equal(r["y"][i], arrays(i, 8)["y"])
  names = [f"shard_{a:02d}-{a + 8:02d}.npz" for a in range(0, 40, 8)]
  assert sorted(p.name for p in (tmp_path / "p0").iterdir()) == ["meta.json", *names]
  assert sorted(p.name for p in (tmp_path / "p1").iterdir()) == before  # Process 1 writes nothing.
