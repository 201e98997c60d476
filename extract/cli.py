"""`llmembed-extract`: fill the embedding cache for a data set and a backbone (Hydra app).

llmembed-extract dataset=mr backbone=smollm2
llmembed-extract -m dataset=mr,trec backbone=smollm2,minilm
llmembed-extract dataset=file dataset.path=my.csv backbone=local backbone.path=/models/x
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from llmembed.errors import reported
from llmembed.extract.pipeline import Interrupted, extract


@hydra.main(version_base=None, config_path="../conf", config_name="extract")
def main(cfg: DictConfig) -> None:
    try:
        with reported("llmembed-extract"):
            result = extract(cfg)
    except Interrupted as stop:
        print(stop, file=sys.stderr)
        # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        sys.exit(128 + stop.signal_number)
    print(result.summary())


if __name__ == "__main__":
    main()
