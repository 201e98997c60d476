"""Runners behind docs/RESULTS.md: one module per experiment, run from the repository root as
`python -m scripts.experiments.<name> [hydra overrides]`; `write_results` turns their JSON into the page."""
