"""A gs:// workdir end to end, as a pod user runs it: the real CLI trains, resumes, samples and
extracts with its workdir in a bucket served on loopback by a GCS emulator (gcp-storage-emulator, in
memory, with the fixes of support/gcs_emulator.py). Both GCS clients the run uses are pointed at it:
etils.epath's gcsfs (STORAGE_EMULATOR_HOST; EPATH_USE_TF=0, since TF's GCS client has no endpoint
setting) and tensorstore, which writes orbax's arrays (TENSORSTORE_GCS_HTTP_URL;
GOOGLE_AUTH_TOKEN_FOR_TESTING stops it looking for credentials). The bucket is checked through the
emulator's own JSON API, not through the clients under test."""

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

pytest.importorskip("gcp_storage_emulator")
pytest.importorskip("gcsfs")

from support.cli import free_port
from support.cli import multiprocess_env
from support.cli import run_main
from support.codes import read_split
from support.codes import write_codes
from support.paths import ROOT
from support.paths import TESTS
from support.weights import random_vq_params

from npp_jax import checkpoints  # noqa: E402
from npp_jax import config_lib  # noqa: E402
from npp_jax import files  # noqa: E402
from npp_jax import preflight  # noqa: E402
from npp_jax.models import vq  # noqa: E402


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """(emulator URL, environment for CLI processes, emulator log); the emulator runs as a subprocess
  for this module."""
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  log = open(tmp_path_factory.mktemp("emulator") / "log.txt", "w")
  # support/gcs_emulator.py: the emulator, answering as real GCS does where the clients need it.
  proc = subprocess.Popen(
    [
      sys.executable,
      os.path.join(TESTS, "support", "gcs_emulator.py"),
      "start",
      "--host=127.0.0.1",
      f"--port={port}",
      "--in-memory",
      "--default-bucket=bucket",
    ],
    stdout=log,
    stderr=subprocess.STDOUT,
  )
  deadline = time.time() + 60
  while True:
    try:
      with socket.create_connection(("127.0.0.1", port), timeout=1):
        break
    except OSError:
      if proc.poll() is not None or time.time() > deadline:
        proc.kill()
        pytest.fail(f"the GCS emulator did not start (see {log.name})")
      time.sleep(0.2)
  env = multiprocess_env(1)
  for k in ("GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG"):
    env.pop(k, None)
  env.update(
    STORAGE_EMULATOR_HOST=url,
    TENSORSTORE_GCS_HTTP_URL=url,
    GOOGLE_AUTH_TOKEN_FOR_TESTING="test",
    EPATH_USE_TF="0",
  )
  yield url, env, log.name
  proc.terminate()
  proc.wait(timeout=30)
  log.close()


def objects(url, prefix):
  """Object names under gs://bucket/prefix, as the emulator holds them."""
  q = urllib.parse.urlencode({"prefix": prefix})
  with urllib.request.urlopen(f"{url}/storage/v1/b/bucket/o?{q}") as r:
    return sorted(item["name"] for item in json.load(r).get("items", []))


def fetch(url, name):
  with urllib.request.urlopen(
    f"{url}/download/storage/v1/b/bucket/o/{urllib.parse.quote(name, safe='')}?alt=media"
  ) as r:
    return r.read()


def cli(env, cwd, *args, timeout=300):
  """The CLI run from `cwd` (not the checkout: a mangled relative gs:/ folder would land there)."""
  return run_main(*args, env=env, cwd=cwd, timeout=timeout)


def ok(r):
  assert r.returncode == 0, r.stderr[-3000:]
  return r


@pytest.mark.timeout(900)
def test_train_resume_sample_extract_with_workdirs_in_a_bucket(tmp_path, gcs):
  url, env, log = gcs
  ds = str(tmp_path / "codes")
  write_codes(ds)
  train = [
    f"--config={ROOT}/configs/tiny.py",
    "--workdir=gs://bucket/run",
    f"--config.data.path={ds}",
  ]

  ok(cli(env, tmp_path, *train, "--config.train.max_steps=4"))
  assert "run/checkpoints/4/state/_METADATA" in objects(url, "run/checkpoints/4/")
  r = ok(cli(env, tmp_path, *train, "--config.train.max_steps=8"))
  assert "Restoring checkpoint from gs://bucket/run/checkpoints/4" in r.stderr
  run = objects(url, "run/")
  assert {n.split("/")[2] for n in run if n.startswith("run/checkpoints/")} >= {"4", "8"}
  events = [n for n in run if n.startswith("run/events.out.tfevents.")]
  assert len(events) == 2 and all(
    fetch(url, n) for n in events
  )  # One event file per launch, non-empty.

  ok(
    cli(
      env,
      tmp_path,
      f"--config={ROOT}/configs/tiny.py",
      "--mode=sample",
      "--workdir=gs://bucket/samples",
      "--config.sample.checkpoint=gs://bucket/run",
      "--config.sample.num_images=8",
      "--config.sample.batch_size=8",
    )
  )
  assert "samples/samples/samples_8.npz" in objects(url, "samples/")
  with np.load(io.BytesIO(fetch(url, "samples/samples/samples_8.npz"))) as z:
    codes = {k: z[k] for k in z.files}
  assert any(v.shape[0] == 8 and v.dtype.kind in "iu" for v in codes.values()), {
    k: v.shape for k, v in codes.items()
  }

  # Extraction: the workdir (settings, shards) in the bucket, the code data set local
  # (array_record).
  vq_dir = str(tmp_path / "vq")
  cfg = vq.VQConfig.from_config(config_lib.load("configs/demo.py:smoke").vq)
  checkpoints.save_params(vq_dir, random_vq_params(cfg, 3))
  out = str(tmp_path / "extracted")
  ok(
    cli(
      env,
      tmp_path,
      "--mode=extract",
      f"--config={ROOT}/configs/demo.py:smoke",
      "--workdir=gs://bucket/ex",
      f"--config.extract.vq_checkpoint={vq_dir}",
      f"--config.extract.output={out}",
      "--config.extract.split=test",
      "--config.extract.aug=none",
      "--config.extract.batch_size=256",
      "--config.extract.keep_shards=True",
      "--config.extract.num_threads=2",
    )
  )
  assert objects(url, "ex/") == [
    "ex/extract_tmp/test/settings.json",
    "ex/extract_tmp/test/shard_000000.npz",
    "ex/extract_tmp/test/shard_000001.npz",
  ]
  ex_codes, labels = read_split(out, "test")
  assert len(ex_codes) == len(labels) == 500
  assert not os.path.exists(tmp_path / "gs:")  # Every gs:// path reached the file layer untouched.
  # Every request answered: a 5xx (501 for an API the emulator lacks) costs a client's retries with
  # backoff, about 33 s for each of gcsfs's, and hides what real GCS would have answered.
  with open(log) as f:
    assert not [line for line in f if re.search(r'HTTP/1\.1" 5\d\d ', line)]


def test_a_gs_workdir_is_not_made_local(tmp_path, monkeypatch):
  """The old os.path.abspath turned gs://bucket/run into <cwd>/gs:/bucket/run."""
  monkeypatch.chdir(tmp_path)
  assert str(files.absolute("gs://bucket/run")) == "gs://bucket/run"
  assert str(preflight.check_workdir("gs://bucket/run")) == "gs://bucket/run"
  assert not os.path.exists(tmp_path / "gs:")


@pytest.mark.parametrize(
  "args,field",
  [
    (
      [
        f"--config={ROOT}/configs/tiny.py",
        "--workdir={tmp}/w",
        "--config.data.path=gs://bucket/codes",
      ],
      "data.path",
    ),
    (
      [
        "--mode=extract",
        f"--config={ROOT}/configs/demo.py:smoke",
        "--workdir=gs://bucket/ex",
        "--config.extract.vq_checkpoint={tmp}/vq",
      ],
      "extract.output",
    ),
    (
      [
        "--mode=extract",
        f"--config={ROOT}/configs/demo.py:smoke",
        "--workdir={tmp}/w",
        "--config.extract.vq_checkpoint={tmp}/vq",
        "--config.extract.output=gs://bucket/codes",
      ],
      "extract.output",
    ),
  ],
)
def test_a_code_data_set_in_a_bucket_is_refused_before_anything_starts(tmp_path, gcs, args, field):
  """array_record opens files natively: a gs:// data set would fail after the whole extraction."""
  url, env, _ = gcs
  r = cli(env, tmp_path, *[a.format(tmp=tmp_path) for a in args], timeout=120)
  last = r.stderr.strip().splitlines()[-1]
  assert r.returncode != 0 and last.startswith(f"error: {field}") and "gcsfuse" in last, last
  assert not os.listdir(tmp_path) and objects(url, "codes/") == []
