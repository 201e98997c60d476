"""What docs/RESULTS.md names and compares: the row keys of the result files that the headline
shows, and, per section, the comparisons its reading makes (each gets a paired test on the page).
Row names that a committed config gives (experiment 3's heads, experiment 4's fine-tuning setups)
are read from the config, so the page names exactly what ran."""

# ruff: noqa: E501  (row names are long strings)
from __future__ import annotations

from scripts.experiments.common import compose_cfg

COOC = "llmembed's co-occurrence head (standardized inputs, every block projected, early stopping, batch 256)"
BEST = "SmolLM2 best single layer (validation), logreg"
EITHER = "SmolLM2 or MiniLM best single layer (validation), logreg"
LAST = "SmolLM2 last layer (L30, mean), logreg"
CONCAT = "SmolLM2 concatenation of layers chosen on validation, logreg"
CONCAT2 = "SmolLM2 + MiniLM concatenation of layers chosen on validation, logreg"
COOC_PAPER = f"SmolLM2 + MiniLM, {COOC}, paper's last five layers (σ on validation)"
COOC_CHOSEN = f"SmolLM2 + MiniLM, {COOC}, layers chosen on validation (σ on validation)"
PLAIN = "prompting SmolLM2, plain template, uncalibrated"
CHAT = "prompting SmolLM2, chat template, calibrated"
MINILM_BEST = "minilm best (layer, pooling) on validation"
MASKED_LAST5 = "pooling: mask-aware mean, no BOS (llmembed); last five layers, mean"
MASKED_BEST = "pooling: mask-aware mean, no BOS (llmembed); best single layer on validation"
PADDED_LAST5 = "pooling: mean over the padded length, no BOS; last five layers, mean"
PADDED_BEST = "pooling: mean over the padded length, no BOS; best single layer on validation"
NOBOS_BEST = (
    "pooling: BOS in front, mask-aware mean without the BOS state; best single layer on validation"
)
PAPER_LAST5 = (
    "pooling: BOS in front, mean over the padded length (the paper's code); last five layers, mean"
)
LAYERS_MEAN = "layers: the paper's last five layers, mean (llmembed, logreg)"
# The first run's raw-input head (every block projected, MiniLM too), no longer in the config.
RAW_PROJECTED = "head: raw inputs, every block projected (MiniLM too), early stopping, batch 256, σ on validation; SmolLM2 last five + MiniLM L6"
SMOL_BEST = "smollm2 best (layer, pooling) on validation"


def labels() -> dict[str, str]:
    """Row names that the committed configs give (experiment 3's heads, experiment 4's
    fine-tuning setups), so the page names exactly what ran."""
    recipe = compose_cfg("classify", ["experiment=results_recipe"]).results.recipe
    ft = compose_cfg("classify", ["experiment=results_counterparts"]).results.counterparts
    heads = {
        k: f"head: {v.label}, σ on validation; SmolLM2 last five + MiniLM L6"
        for k, v in recipe.heads.items()
    }
    return {
        **{f"head.{k}": v for k, v in heads.items()},
        **{f"ft.{k}": str(v.label) for k, v in ft.finetuning.setups.items()},
    }


def headline_rows(lab: dict[str, str]) -> list[tuple[str, str, str]]:
    """The page's first table (and the README's): (what the table calls it, experiment, row key)."""
    return [
        ("SmolLM2, best single layer and pooling (validation)", "fusion", BEST),
        ("SmolLM2, last layer, mean", "fusion", LAST),
        ("SmolLM2, layers concatenated (validation)", "fusion", CONCAT),
        ("SmolLM2 + MiniLM, layers concatenated (validation)", "fusion", CONCAT2),
        (f"SmolLM2 + MiniLM, {COOC}, the paper's last five layers", "fusion", COOC_PAPER),
        (f"SmolLM2 + MiniLM, {COOC}, layers chosen on validation", "fusion", COOC_CHOSEN),
        (
            "SmolLM2 + MiniLM, the paper's head as its code has it (raw inputs, MiniLM unprojected, 50 fixed epochs, batch 1,024, softmax before the loss), the paper's last five layers",
            "recipe",
            lab["head.faithful"],
        ),
        ("MiniLM, best single layer and pooling (validation)", "layers", MINILM_BEST),
        (f"{PLAIN}, zero-shot (texts cut to 256 tokens)", "counterparts", f"{PLAIN}, zero-shot"),
        (
            f"{PLAIN}, 1 demonstration per class (texts cut to 256 tokens)",
            "counterparts",
            f"{PLAIN}, 1 demonstration per class",
        ),
        (f"{CHAT}, zero-shot", "counterparts", f"{CHAT}, zero-shot"),
        (
            f"{CHAT}, demonstrations per class chosen on validation",
            "counterparts",
            f"{CHAT}, demonstrations per class chosen on validation",
        ),
        (lab["ft.minilm_one_lr"], "counterparts", lab["ft.minilm_one_lr"]),
        (lab["ft.minilm"], "counterparts", lab["ft.minilm"]),
        (lab["ft.smollm2_lora"], "counterparts", lab["ft.smollm2_lora"]),
    ]


def comparisons(lab: dict[str, str]) -> dict[str, list[tuple[str, tuple, tuple]]]:
    """Per section, the comparisons its reading makes: (what, (experiment, row) of A, of B); the
    table gives A - B with its corrected interval and both p-values, on every data set with both."""
    ft = lab["ft.minilm_one_lr"]
    return {
        "headline": [
            (
                "MiniLM best single layer − SmolLM2 best single layer",
                ("layers", MINILM_BEST),
                ("layers", SMOL_BEST),
            ),
            (
                "SmolLM2 best single layer − SmolLM2 last layer (mean)",
                ("fusion", BEST),
                ("fusion", LAST),
            ),
            (
                "SmolLM2 + MiniLM concatenated − SmolLM2 best single layer",
                ("fusion", CONCAT2),
                ("fusion", BEST),
            ),
            (
                "SmolLM2 + MiniLM concatenated − SmolLM2 or MiniLM best single layer",
                ("fusion", CONCAT2),
                ("fusion", EITHER),
            ),
            (
                "llmembed's co-occurrence head, paper's layers − SmolLM2 best single layer",
                ("fusion", COOC_PAPER),
                ("fusion", BEST),
            ),
            (
                "the paper's head as its code has it − llmembed's head (experiment 3)",
                ("recipe", lab["head.faithful"]),
                ("recipe", lab["head.llmembed"]),
            ),
            (
                "prompting, chat and calibrated, k on validation − plain zero-shot",
                ("counterparts", f"{CHAT}, demonstrations per class chosen on validation"),
                ("counterparts", f"{PLAIN}, zero-shot"),
            ),
            (
                "SmolLM2 best single layer − prompting, plain zero-shot",
                ("fusion", BEST),
                ("counterparts", f"{PLAIN}, zero-shot"),
            ),
            (
                "SmolLM2 best single layer − prompting, chat and calibrated, k on validation",
                ("fusion", BEST),
                ("counterparts", f"{CHAT}, demonstrations per class chosen on validation"),
            ),
            (
                "fine-tuning MiniLM (one learning rate) − SmolLM2 + MiniLM concatenated",
                ("counterparts", ft),
                ("fusion", CONCAT2),
            ),
            (
                "fine-tuning MiniLM (one learning rate) − SmolLM2 best single layer",
                ("counterparts", ft),
                ("fusion", BEST),
            ),
            (
                "fine-tuning MiniLM (learning rate on validation) − SmolLM2 + MiniLM concatenated",
                ("counterparts", lab["ft.minilm"]),
                ("fusion", CONCAT2),
            ),
            (
                "LoRA on SmolLM2 − SmolLM2 best single layer",
                ("counterparts", lab["ft.smollm2_lora"]),
                ("fusion", BEST),
            ),
        ],
        "layers": [
            (
                "MiniLM best − SmolLM2 best (layer and pooling on validation)",
                ("layers", MINILM_BEST),
                ("layers", SMOL_BEST),
            ),
            (
                "SmolLM2 best − SmolLM2 last layer, mean",
                ("layers", SMOL_BEST),
                ("layers", "smollm2:mean L30"),
            ),
            (
                "SmolLM2 last layer: last token − mean",
                ("layers", "smollm2:last L30"),
                ("layers", "smollm2:mean L30"),
            ),
        ],
        "fusion": [
            (
                "SmolLM2 concatenated − SmolLM2 best single layer",
                ("fusion", CONCAT),
                ("fusion", BEST),
            ),
            (
                "SmolLM2 + MiniLM concatenated − SmolLM2 best single layer",
                ("fusion", CONCAT2),
                ("fusion", BEST),
            ),
            (
                "SmolLM2 + MiniLM concatenated − SmolLM2 or MiniLM best single layer",
                ("fusion", CONCAT2),
                ("fusion", EITHER),
            ),
            (
                "co-occurrence head (+ MiniLM), paper's layers − SmolLM2 best single layer",
                ("fusion", COOC_PAPER),
                ("fusion", BEST),
            ),
            (
                "co-occurrence head (+ MiniLM), chosen layers − paper's layers",
                ("fusion", COOC_CHOSEN),
                ("fusion", COOC_PAPER),
            ),
            (
                "co-occurrence head (+ MiniLM), chosen layers − SmolLM2 + MiniLM concatenated",
                ("fusion", COOC_CHOSEN),
                ("fusion", CONCAT2),
            ),
        ],
        "recipe": [
            (what, ("recipe", ka), (exp_b, kb))
            for what, ka, exp_b, kb in (
                ("padded mean − mask-aware mean, last five", PADDED_LAST5, "recipe", MASKED_LAST5),
                (
                    "padded mean − mask-aware mean, best single layer",
                    PADDED_BEST,
                    "recipe",
                    MASKED_BEST,
                ),
                (
                    "BOS in front (without its state) − no BOS, best single layer",
                    NOBOS_BEST,
                    "recipe",
                    MASKED_BEST,
                ),
                (
                    "the paper's pooling − llmembed's, last five",
                    PAPER_LAST5,
                    "recipe",
                    MASKED_LAST5,
                ),
                (
                    "the paper's pooling, last five − llmembed's, best single layer",
                    PAPER_LAST5,
                    "recipe",
                    MASKED_BEST,
                ),
                (
                    "the paper's last five, mean − experiment 2's SmolLM2 concatenation",
                    LAYERS_MEAN,
                    "fusion",
                    CONCAT,
                ),
                (
                    "the paper's head as its code has it − llmembed's head",
                    lab["head.faithful"],
                    "recipe",
                    lab["head.llmembed"],
                ),
                (
                    "raw inputs, every block projected − llmembed's head",
                    RAW_PROJECTED,
                    "recipe",
                    lab["head.llmembed"],
                ),
            )
        ],
        "counterparts": [
            (
                "chat, calibrated, k on validation − plain, zero-shot",
                ("counterparts", f"{CHAT}, demonstrations per class chosen on validation"),
                ("counterparts", f"{PLAIN}, zero-shot"),
            ),
            (
                "chat, calibrated, zero-shot − plain, zero-shot",
                ("counterparts", f"{CHAT}, zero-shot"),
                ("counterparts", f"{PLAIN}, zero-shot"),
            ),
            (
                "plain, 1 demonstration per class − plain, zero-shot",
                ("counterparts", f"{PLAIN}, 1 demonstration per class"),
                ("counterparts", f"{PLAIN}, zero-shot"),
            ),
            (
                "fine-tuning MiniLM, one learning rate − SmolLM2 + MiniLM concatenated",
                ("counterparts", ft),
                ("fusion", CONCAT2),
            ),
            (
                "fine-tuning MiniLM, learning rate on validation − one learning rate",
                ("counterparts", lab["ft.minilm"]),
                ("counterparts", ft),
            ),
            (
                "LoRA on SmolLM2 − SmolLM2 best single layer",
                ("counterparts", lab["ft.smollm2_lora"]),
                ("fusion", BEST),
            ),
            (
                "LoRA on SmolLM2 − SmolLM2 + MiniLM concatenated",
                ("counterparts", lab["ft.smollm2_lora"]),
                ("fusion", CONCAT2),
            ),
            (
                "fine-tuning MiniLM, learning rate on validation − LoRA on SmolLM2",
                ("counterparts", lab["ft.minilm"]),
                ("counterparts", lab["ft.smollm2_lora"]),
            ),
            (
                "fine-tuning MiniLM, one learning rate − LoRA on SmolLM2",
                ("counterparts", ft),
                ("counterparts", lab["ft.smollm2_lora"]),
            ),
        ],
    }
