"""Stage two: classifier heads, training, metrics, saved models, prediction and reports."""
