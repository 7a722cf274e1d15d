"""python -m npp_jax.main --config=configs/b.py --workdir=DIR [--mode=train|sample|...|compile]"""

import dataclasses
import os
import sys

from absl import app
from absl import flags
from absl import logging

from npp_jax import cli

FLAGS = flags.FLAGS
cli.define_config()
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs of this run.")
flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "sample", "extract", "train_vq", "demo", "evaluate", "compile"],
  "The job to run.",
)
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
  ):  # The demo keeps the console for its progress; it logs INFO to WORKDIR/log.txt.
    logging.set_verbosity(logging.WARNING)
  import jax  # After absl parsed the flags: JAX reads its own (e.g. --jax_platforms) at import.

  if FLAGS.mode == "compile":
    # Its TPU devices are libtpu's compile-only topology; the process itself runs on the CPU, so
    # libtpu's TPU backend is not started (its start-up warnings would reach the console).
    jax.config.update("jax_platforms", "cpu")

  from npp_jax import distributed
  from npp_jax import preflight

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
  config, workdir = FLAGS.config, FLAGS.workdir
  # Every field the mode reads, the workdir and the kind of each weights path: before any compile or write.
  preflight.check(FLAGS.mode, config, workdir)
  if FLAGS.mode == "train":
    from npp_jax import loop
    from npp_jax.jobs import train

    if train.train_and_evaluate(config, workdir)["stopped_early"]:
      sys.exit(
        loop.EXIT_PREEMPTED
      )  # Saved on SIGTERM; a launcher runs the same command again to resume.
  elif FLAGS.mode == "sample":
    from npp_jax.jobs import sample

    if not config.evaluate.reference:
      sample.sample_and_save(config, workdir)
    else:  # Score what is sampled; the scoring inputs are checked before the first sample.
      from npp_jax.jobs import evaluate

      inputs = evaluate.prepare(config, samples=False)
      evaluate.evaluate(
        config, workdir, inputs=inputs, samples_path=sample.sample_and_save(config, workdir)
      )
  elif FLAGS.mode == "extract":
    from npp_jax.jobs import extract

    extract.extract(config, workdir)
  elif FLAGS.mode == "train_vq":
    from npp_jax import loop
    from npp_jax.jobs import train_vq

    if train_vq.train_vq(config, workdir) is None:
      sys.exit(loop.EXIT_PREEMPTED)  # Saved on SIGTERM; the same command resumes.
  elif FLAGS.mode == "demo":
    from npp_jax.jobs import demo

    demo.run(config, workdir)
  elif FLAGS.mode == "evaluate":
    from npp_jax.jobs import evaluate

    evaluate.evaluate(config, workdir)
  elif FLAGS.mode == "compile":
    from npp_jax.jobs import compile as compile_job

    compile_job.run(config, workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.absl_flags_parser)
