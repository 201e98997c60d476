"""Stage two, classifier heads, training, metrics and prediction (arrives with the training stage)."""
