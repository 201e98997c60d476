"""`llmembed-extract`: fill the embedding cache for a data set and a backbone (Hydra app).

llmembed-extract dataset=mr backbone=smollm2
llmembed-extract -m dataset=mr,trec backbone=smollm2,minilm
llmembed-extract dataset=file dataset.path=my.csv backbone=local backbone.path=/models/x
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from llmembed.extract.pipeline import extract


@hydra.main(version_base=None, config_path="../conf", config_name="extract")
def main(cfg: DictConfig) -> None:
    result = extract(cfg)
    print(result.summary())


if __name__ == "__main__":
    main()
