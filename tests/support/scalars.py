"""The TensorBoard scalars a run wrote, read as TensorBoard reads them."""

import glob
import os


def read_scalars(workdir):
  """{tag: [(step, value)]} of every scalar in the TensorBoard event files written to workdir."""
  # tensorboard's own reader, as TensorBoard reads them: no TensorFlow needed (npp_jax.summaries).
  from tensorboard.backend.event_processing import event_file_loader
  from tensorboard.util import tensor_util

  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents*"))):
    for event in event_file_loader.EventFileLoader(path).Load():
      for v in event.summary.value:
        if v.HasField("tensor") and v.metadata.plugin_data.plugin_name == "scalars":
          out.setdefault(v.tag, []).append((event.step, float(tensor_util.make_ndarray(v.tensor))))
  return out
