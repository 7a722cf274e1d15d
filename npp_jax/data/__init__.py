"""Code data sets (class: code_dataset; text: captions), image sources, LlamaGen folders, digits."""


def reader(model):
  """The module that reads a model's kind of code data set: class labels (code_dataset) or
  captions (captions), both with load_metadata, make_train_iterator and make_eval_iterator."""
  if model.condition == "text":
    from npp_jax.data import captions

    return captions
  from npp_jax.data import code_dataset

  return code_dataset
