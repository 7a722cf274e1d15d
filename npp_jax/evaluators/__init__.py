"""Training evaluators: plug-ins the trainer runs between steps, one interface (as big_vision's).

An evaluator has
  due(step) -> bool               whether it runs after this step;
  __call__(state, step) -> dict   its scalars ("eval/..."), from the train state it is handed;
  seconds                         time spent in it so far (the trainer leaves it out of its step
  time).
The trainer writes the scalars beside the cost so far. Evaluators import libraries (sampling, fid,
data), never a job: held-out NLL (heldout_nll) and the FID of fresh samples (sample_metrics).
"""
