"""Real processes: extraction with 2 processes x 4 fake CPU devices on loopback (gloo collectives),
started from the CLI's flags, writes the same code data set as one process with 8 devices: each
process reads and encodes its share of every shard, process 0 alone writes."""

import os
import subprocess

import numpy as np
import pytest
from support.cli import free_port
from support.cli import multiprocess_env
from support.cli import start_main
from support.codes import read_split
from support.weights import random_vq_params

from npp_jax import checkpoints
from npp_jax import config_lib
from npp_jax.jobs import extract
from npp_jax.models import vq

# The demo's VQ (32 px -> 8x8 codes of 256) on the 500 test digits: 2 shards of 250, i.e. 125 rows
# per process padded to 128 (4 devices each), and a last shard that is not full.
OVERRIDES = {
  "extract.split": "test",
  "extract.batch_size": 250,
  "extract.aug": "flip",
  "extract.num_threads": 2,
}


@pytest.mark.timeout(400)
def test_two_processes_extract_the_one_process_data_set(tmp_path):
  config = config_lib.load("configs/demo.py:smoke")
  cfg = vq.VQConfig.from_config(config.vq)
  vq_dir = str(tmp_path / "vq")
  checkpoints.save_params(vq_dir, random_vq_params(cfg, 3))
  overrides = {**OVERRIDES, "extract.vq_checkpoint": vq_dir}

  two = str(tmp_path / "two")
  cmd = [
    "--mode=extract",
    "--config=configs/demo.py:smoke",
    f"--workdir={two}",
    *[f"--config.{k}={v}" for k, v in overrides.items()],
    f"--coordinator_address=127.0.0.1:{free_port()}",
    "--num_processes=2",
  ]
  procs, logs = [], []
  for i in range(2):
    logs.append(str(tmp_path / f"process_{i}.log"))
    with open(logs[-1], "w") as f:
      procs.append(
        start_main(
          *cmd,
          f"--process_id={i}",
          env=multiprocess_env(2),
          stdout=f,
          stderr=subprocess.STDOUT,
        )
      )
  try:
    statuses = [p.wait(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  tails = "\n".join(open(log).read()[-3000:] for log in logs)
  assert statuses == [0, 0], tails
  for i, log in enumerate(logs):
    assert f"JAX process {i}/2, 4 local / 8 global devices (cpu)." in open(log).read()

  config.update_from_flattened_dict(overrides)
  one = str(tmp_path / "one")
  out = extract.run(config, one).outputs  # This process: 8 devices.
  assert out["num_examples"] == 500 and out["shards_encoded"] == 2
  codes_two, labels_two = read_split(os.path.join(two, "codes"), "test")
  codes_one, labels_one = read_split(os.path.join(one, "codes"), "test")
  assert codes_two.shape == (500, 2, 8, 8) and len(np.unique(codes_one)) > 8
  np.testing.assert_array_equal(codes_two, codes_one)
  np.testing.assert_array_equal(labels_two, labels_one)
  assert not os.path.exists(os.path.join(two, "extract_tmp"))  # Process 0 cleaned up after writing.
