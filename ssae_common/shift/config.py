"""The options of a SHIFT run (ssae-shift), each declared once: its default, help text and bounds.

Light on purpose (standard library and core.config only): the tool builds its --help from it."""
from __future__ import annotations

from dataclasses import dataclass

from ..core.config import ConfigError, check_bounds, option
from ..data.config import MODEL_DTYPE_HELP, MODEL_DTYPES


@dataclass(frozen=True)
class ShiftConfig:
    data: tuple[str, ...] = option(
        (), multiple=True, required=True,
        help="Bias in Bios records: .jsonl/.jsonl.gz/.csv/.parquet or hf:LabHC/bias_in_bios[:SPLIT].")
    professions: tuple[str, str] = option(
        ("professor", "nurse"), nargs=2,
        help="Sides A and B, each a comma-separated list of professions (names or LabHC indices).")
    ablate: tuple[str, ...] = option(
        ("auto",), multiple=True,
        help="auto (latents chosen with a gender probe; uses gender labels), a list such as 12,98,200-203, "
             "or NAME=LIST per SAE.", hashed=False, why="hashed per SAE (saes[].ablate)")
    ablation: str = option(
        "zero", choices=("zero", "mean"),
        help="Ablated latents (and skyline neurons) are set to 0 or to their mean on the ambiguous set.")
    slice: str | None = option(
        None, help="Keep only the most active fraction of latents as candidates, e.g. 1/8 (the rest counts as error).")
    model: str | None = option(None, help="Language model", derived="the SAE's cfg.json model")
    model_dtype: str = option("auto", help=MODEL_DTYPE_HELP, choices=MODEL_DTYPES)
    explanations: tuple[str, ...] = option(
        (), multiple=True, help="ssae-explain output (folder or explanations.jsonl), in --sae order or NAME=PATH.",
        hashed=False, why="hashed per SAE (saes[].explanations)")
    pairing: str = option(
        "auto", choices=("auto", "female-male", "male-female"),
        help="Genders of sides A and B in the ambiguous training set (auto: the pairing with more documents; "
             "ties: A female).")
    top: int = option(50, min=1, help="Top attributed latents considered by auto.")
    auto_max: int = option(25, min=1, help="Most latents auto ablates.")
    auto_min_drop: float = option(
        0.01, min=0, help="auto stops when the next latent lowers the gender probe's validation AUC by less.")
    show: int = option(20, min=0, help="Top latents listed in the report.")
    test_fraction: float = option(
        0.4, above=0, max=1, help="Test documents per cell, as a fraction of the smallest cell.")
    val_fraction: float = option(
        0.2, above=0, max=1, help="Validation documents per cell (for auto), as a fraction of the smallest cell.")
    max_per_cell: int = option(1000, min=3, help="Documents kept per cell (seeded sample) before splitting.")
    probe: str = option(
        "l2", choices=("l2", "marks"),
        help="Probe training: l2 (sklearn L2 logistic regression, standardised features, --probe-c) or marks "
             "(as Marks et al.: unregularised logistic regression on raw pooled activations by Adam, 100 "
             "full-batch steps at lr 1e-3).")
    probe_c: float = option(
        1.0, above=0, help="Inverse L2 strength of the logistic-regression probes (standardised features).")
    mask_professions: bool = option(
        False, help="Replace profession titles and their variants (nurse, RN, physician, surgeon, surgery, "
                    "Dr., MD, ...; see docs/shift.md) by a neutral word before the LM reads the text.")
    mask_words: str | None = option(
        None, help="File of words to mask instead of the built-in list (one regular expression a line, "
                   "whole words, any case).")
    mask_specialties: bool = option(
        False, help="Also mask medical specialty, procedure and body-part words (surgery's cues once the "
                    "titles are masked: orthopedic, plastic, spine, knee, internal medicine, ...; see "
                    "docs/shift.md).")
    seeds: int = option(
        5, min=1, help="Seeded splits (seeds --seed, --seed + 1, ...): the whole experiment runs on each; "
                       "the table shows mean and sd.")
    context_size: int = option(128, min=2, help="Tokens per document, BOS included (longer documents are truncated).")
    batch_size: int = option(16, min=1, help="Documents per forward pass.",
                             hashed=False, why="a batch size: documents are padded at the end, which a causal "
                                               "LM's earlier positions do not see")
    text_field: str = option("auto", help="Text field (auto: hard_text, text or bio).")
    profession_field: str = option("profession", help="Field holding the profession (a name or a LabHC index).")
    gender_field: str = option("gender", help="Field holding the gender (0/1, m/f or male/female).")

    def check(self) -> None:
        check_bounds(self)
        if not self.data:
            raise ConfigError("data", self.data, "give at least one Bias in Bios input")
        if len(self.professions) != 2:
            raise ConfigError("professions", self.professions, "expected two sides, A and B")
        if self.test_fraction + self.val_fraction >= 1:
            raise ConfigError("val_fraction", self.val_fraction,
                              f"with a test fraction of {self.test_fraction}, the two must sum to less than 1")
        slice_fraction(self.slice)


def slice_fraction(value: str | None) -> tuple[int, int] | None:
    """`--slice 1/8` -> (1, 8); None, "", "1" and "1/1" keep every latent (None)."""
    if value in (None, "", "1", "1/1"):
        return None
    try:
        num, den = (int(v) for v in str(value).split("/"))
    except ValueError:
        raise ConfigError("slice", value, "expected a fraction such as 1/8") from None
    if not 0 < num <= den:
        raise ConfigError("slice", value, "need 0 < numerator <= denominator")
    return num, den
