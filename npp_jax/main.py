"""python -m npp_jax.main --config=configs/b.py --workdir=DIR [--mode=MODE]

Flags -> the job of --mode (npp_jax.jobs) -> its check, before anything compiles or is written ->
its run; exit status 75 when a SIGTERM stopped the job after saving (the same command resumes).
"""

import dataclasses
import os
import sys

from absl import app
from absl import flags
from absl import logging

from npp_jax import cli
from npp_jax import jobs

FLAGS = flags.FLAGS
cli.define_config()
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs of this run.")
flags.DEFINE_enum("mode", "train", list(jobs.MODES), "The job to run (npp_jax.jobs).")
flags.DEFINE_enum(
  "distributed",
  "auto",
  ["auto", "true", "false"],
  "jax.distributed.initialize(): 'auto' does it when launched as one of several processes "
  "(SLURM with several tasks, a TPU pod, Open MPI, or the three flags below given).",
)
flags.DEFINE_string(
  "coordinator_address", None, "HOST:PORT of process 0 (else JAX_COORDINATOR_ADDRESS)."
)
flags.DEFINE_integer("num_processes", None, "Processes in this run (else JAX_NUM_PROCESSES).")
flags.DEFINE_integer(
  "process_id", None, "This process, 0 .. num_processes - 1 (else JAX_PROCESS_ID)."
)
flags.DEFINE_integer(
  "heartbeat_timeout_seconds",
  100,
  "Several processes: seconds without a heartbeat before the coordination service declares a "
  "process dead (a killed process, a host that died) and ends the others with one line.",
)
flags.DEFINE_bool("traceback", False, "Show the full traceback of a bad-input error, not one line.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  # Bad input (ValueError) and the environment (OSError) end in one `error:` line, exit status 2.
  cli.run(_run, show_traceback=FLAGS.traceback)


def _run():
  if (
    FLAGS.mode == "demo"
  ):  # The demo keeps the console for its progress; INFO goes to WORKDIR/log.txt.
    logging.set_verbosity(logging.WARNING)
  import jax  # After absl parsed the flags: JAX reads its own (e.g. --jax_platforms) at import.

  if FLAGS.mode == "compile":
    # Its TPU devices are libtpu's compile-only topology; the process itself runs on the CPU, so
    # libtpu's TPU backend is not started (its start-up warnings would reach the console).
    jax.config.update("jax_platforms", "cpu")

  from npp_jax import distributed
  from npp_jax import loop

  launch = distributed.resolve(
    FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, os.environ
  )
  if launch is not None:
    launch = dataclasses.replace(launch, heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds)
    distributed.initialize(launch, distributed.resume_hint(FLAGS.mode, FLAGS.workdir))
  logging.info(
    "JAX process %d/%d, %d local / %d global devices (%s).",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].device_kind,
  )
  job = jobs.get(FLAGS.mode)
  # Every field the job reads, the workdir, the weights and data it names: before any compile or
  # write.
  job.check(FLAGS.config, FLAGS.workdir, jobs.Topology.current())
  if job.run(FLAGS.config, FLAGS.workdir).stopped_early:
    sys.exit(loop.EXIT_PREEMPTED)  # Saved on SIGTERM; a launcher runs the same command to resume.


if __name__ == "__main__":
  app.run(main, flags_parser=cli.absl_flags_parser)
