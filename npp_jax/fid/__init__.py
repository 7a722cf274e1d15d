"""FID and its companions (sFID, IS, precision, recall) as the ADM evaluator computes them: image
sets, Inception features (sharded, cached per batch), the reference, and the metrics."""
