"""SHIFT (Marks et al., "Sparse Feature Circuits") on Bias in Bios: remove a probe's reliance on gender by
ablating the SAE latents that carry it.

Steps:
1. Cells. Documents of profession side A or B (each side one or more professions) and gender female or
   male form four cells. A per-cell seeded split gives a balanced test set and a balanced validation
   set (the same count from every cell); the rest trains. The *ambiguous* training set is the two
   correlated cells (A with gender gA, B with gB), equal in size, so gender predicts profession
   perfectly there. The *balanced* training set (equal counts from all four cells) trains the oracle
   and the gender probe.
2. Activations. The LM runs to the SAE's hook; each document is BOS + its first context_size - 1
   tokens, and its activations are mean-pooled over the tokens after BOS (BOS dropped, as harvest does).
3. Probe. Logistic regression (sklearn, L2, on standardised features with the scaling folded back into
   one weight vector) on the pooled activations of the ambiguous set: label 1 = side B.
4. Attribution patching. At the hook, x = decode(f) + err with err = x - decode(f) held fixed, so
   that with nothing ablated the probe sees exactly the original activations. The score of latent j
   is the mean over ambiguous training documents of sum_t dM/df_tj * (a_j - f_tj), where M is the
   probe's logit signed towards the document's true class and a_j the ablation value (0, or the
   latent's mean over the ambiguous training tokens): the estimated change in the correct-class margin
   when j is ablated. Latents are ranked by its absolute value. Since the probe reads the same hook,
   the margin is linear in f and the estimate is exact (the tests check it against real ablation).
5. Selection. A user's list, or `auto`: a gender probe (trained on the balanced training set, gender
   labels) is evaluated on the validation set; among the top attributed latents, greedily add the one
   whose ablation (with those chosen so far) most lowers its accuracy, while that accuracy drops and
   is above chance. This uses gender labels.
6. Ablation and evaluation. Ablating a latent replaces f_tj by its ablation value at every token,
   with the error term and the other latents kept; pooled, x' = x - mean_t(f_tj - a_j) W_dec[j] /
   act_scale. Rows: the original probe, the oracle (trained on balanced data), the neuron skyline
   (the same selection rule applied to raw hook dimensions), SHIFT (the original probe on ablated
   activations) and SHIFT + retrain (a probe retrained on the ablated ambiguous set). `--slice 1/8`
   keeps only the most often active eighth of the latents as candidates; the others count as error.
"""
from __future__ import annotations

import csv
import gzip
import io
import logging
import math
import os
import random
import re
from dataclasses import dataclass, field

import numpy as np

from ..core.config import ConfigError
from ..core.errors import BadInput
from ..core.records import iter_raw
from ..core.stats import roc_auc
from .config import ShiftConfig, slice_fraction

log = logging.getLogger("ssae")

SCHEMA = "ssae.shift/1"
# LabHC/bias_in_bios encodes profession as an index into this list, gender as 0 = male, 1 = female.
BIOS_PROFESSIONS = ("accountant", "architect", "attorney", "chiropractor", "comedian", "composer", "dentist",
                    "dietitian", "dj", "filmmaker", "interior_designer", "journalist", "model", "nurse",
                    "painter", "paralegal", "pastor", "personal_trainer", "photographer", "physician", "poet",
                    "professor", "psychologist", "rapper", "software_engineer", "surgeon", "teacher",
                    "yoga_teacher")
GENDERS = ("male", "female")
GENDER_NAMES = {"male": "male", "m": "male", "man": "male", "0": "male",
                "female": "female", "f": "female", "woman": "female", "1": "female"}
TEXT_FIELDS = ("hard_text", "text", "bio")


# ----------------------------------------------------------------------------------------------- data

@dataclass
class Bio:
    id: str
    text: str
    profession: str
    gender: str
    source: str


def normalise_profession(value) -> str:
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, (int, np.integer)) or (isinstance(value, str) and value.strip().isdigit()):
        index = int(value)
        if not 0 <= index < len(BIOS_PROFESSIONS):
            raise ValueError(value)
        return BIOS_PROFESSIONS[index]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(value)
    return value.strip().lower().replace(" ", "_").replace("-", "_")


def normalise_gender(value) -> str:
    if isinstance(value, bool):
        raise ValueError(value)
    key = str(int(value)) if isinstance(value, (int, np.integer)) else str(value).strip().lower()
    if key not in GENDER_NAMES:
        raise ValueError(value)
    return GENDER_NAMES[key]


def _iter_csv(path: str):
    if not os.path.exists(path):
        raise BadInput(f"{path}: no such file")
    opener = (lambda: io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")) \
        if path.endswith(".gz") else (lambda: open(path, encoding="utf-8", newline=""))
    with opener() as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                yield row, f"{path}:{reader.line_num}"
        except (csv.Error, UnicodeDecodeError) as e:
            raise BadInput(f"{path}:{reader.line_num}: not readable CSV ({e})") from None


def _iter_records(path: str):
    if path.endswith((".csv", ".csv.gz")):
        yield from _iter_csv(path)
        return
    for obj, source in iter_raw(path):
        if not isinstance(obj, dict):
            raise BadInput(f"{source}: expected a JSON record with text, profession and gender fields")
        yield obj, str(source)


def load_bios(paths, professions: set[str], text_field: str = "auto", profession_field: str = "profession",
              gender_field: str = "gender") -> tuple[list[Bio], dict[str, int]]:
    """Bios of the wanted professions from JSONL/CSV/parquet/hf: inputs, in either schema (string labels,
    or LabHC/bias_in_bios integers). Returns them and the count of every profession seen."""
    bios: list[Bio] = []
    seen: dict[str, int] = {}
    for path in paths:
        for obj, where in _iter_records(path):
            for name in (profession_field, gender_field):
                if name not in obj or obj[name] is None or obj[name] == "":
                    raise BadInput(f"{where}: record has no {name!r} field")
            try:
                profession = normalise_profession(obj[profession_field])
            except ValueError:
                raise BadInput(f"{where}: field {profession_field!r} is {obj[profession_field]!r}, expected a "
                               f"profession name or a LabHC/bias_in_bios index 0-{len(BIOS_PROFESSIONS) - 1}") from None
            seen[profession] = seen.get(profession, 0) + 1
            if profession not in professions:
                continue
            try:
                gender = normalise_gender(obj[gender_field])
            except ValueError:
                raise BadInput(f"{where}: field {gender_field!r} is {obj[gender_field]!r}, expected male/female "
                               "or 0/1") from None
            field_name = text_field
            if text_field == "auto":
                field_name = next((k for k in TEXT_FIELDS if isinstance(obj.get(k), str)), None)
                if field_name is None:
                    raise BadInput(f"{where}: record has no text field (looked for {', '.join(TEXT_FIELDS)})")
            text = obj.get(field_name)
            if not isinstance(text, str):
                raise BadInput(f"{where}: record has no {field_name!r} text field")
            doc_id = obj.get("id") or obj.get("_id") or where
            bios.append(Bio(str(doc_id), text, profession, gender, where))
    return bios, seen


# Profession titles and their variants in bios (from the bundled nurse/physician/surgeon bios and the
# common US credentials): replaced by MASK_TOKEN so that a probe must read profession from weaker cues
# (workplace, specialty, duties) while the gender words stay. Each entry is a regular expression matched
# case-insensitively as a whole word; "Dr" needs no space after it ("Dr.Deepak" occurs).
PROFESSION_WORDS = (
    r"nurse[sd]?", r"nursing", r"practitioners?", r"midwi(?:fe|ves|fery)",
    r"RNs?", r"RNC", r"RNFA", r"NPs?", r"LPNs?", r"LVNs?", r"CNAs?", r"BSN", r"MSN", r"DNP", r"FNP", r"CRNA",
    r"CRNP", r"APRN", r"ARNP", r"CCRN", r"anesthetists?",
    r"physicians?", r"doctors?", r"Dr\.?", r"MD", r"M\.D\.?", r"D\.O\.", r"MBBS", r"FACS", r"hospitalists?",
    r"anesthesiologists?", r"(?:neuro)?surgeons?", r"(?:neuro)?surger(?:y|ies)", r"(?:neuro)?surgical(?:ly)?",
    r"professors?", r"Prof\.?",  # the full Bias in Bios's usual pair is professor vs nurse
)
# --mask-specialties: the medical specialty, procedure and body-part words that tell a physician's bio from
# a surgeon's once the titles are masked (made from the bundled physician/surgeon bios' most one-sided
# words, plus the common specialty names). Crude on purpose: "hand", "face", "general", "family",
# "internal" and "medicine" go in every sense.
SPECIALTY_WORDS = (
    r"operat(?:e|es|ed|ing|ion|ions|ive)", r"procedures?", r"(?:re)?construct(?:ive|ion|ions)", r"plastic",
    r"cosmetic", r"aesthetic", r"orthop(?:a)?edic(?:s)?", r"orthop(?:a)?edist", r"trauma", r"spine|spinal",
    r"vascular", r"(?:cardio)?thoracic", r"cardiac", r"cardiology|cardiologist", r"cardiovascular", r"neuro\w*",
    r"transplant\w*", r"implants?", r"endoscop\w*", r"laparoscop\w*", r"arthroscop\w*", r"minimally",
    r"invasive", r"bariatric", r"colorectal", r"oral", r"maxillofacial", r"dental", r"dentistry", r"tooth|teeth",
    r"extractions?", r"BDS", r"MDS", r"FRCS", r"hand", r"hips?", r"knees?", r"shoulders?", r"elbows?",
    r"joints?", r"breasts?", r"facial", r"face", r"tumou?rs?", r"cancer", r"oncology|oncologist", r"sports",
    r"fractures?", r"injur(?:y|ies)", r"replacements?", r"otolaryngology|ENT", r"ophthalmolog\w*|eye",
    r"urology|urologist", r"gynecolog\w*|obstetric\w*|OB/GYN|OBGYN", r"internal", r"medicine", r"family",
    r"primary", r"pediatric\w*|paediatric\w*", r"psychiatr\w*", r"dermatolog\w*", r"infectious", r"emergency",
    r"urgent", r"general",
)
MASK_TOKEN = "professional"


def mask_pattern(words) -> "re.Pattern":
    """One regular expression matching any of `words` (regular expressions) as a whole word, any case."""

    alternatives = "|".join(f"(?:{w})" for w in sorted(words, key=len, reverse=True))
    # whole word: no letter or digit on either side; a trailing "." may be part of the word (Dr., M.D.)
    return re.compile(rf"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])", re.IGNORECASE)


def mask_text(text: str, pattern) -> tuple[str, int]:
    """`text` with every match of `pattern` replaced by MASK_TOKEN, and the number replaced."""
    return pattern.subn(MASK_TOKEN, text)


def read_mask_words(path: str) -> list[str]:
    """A word list: one entry a line (a regular expression, matched as a whole word in any case); blank
    lines and lines starting with # are skipped."""
    import re

    try:
        with open(path, encoding="utf-8") as f:
            lines = [(n, line.strip()) for n, line in enumerate(f, 1)]
    except OSError as e:
        raise ConfigError("mask_words", path, f"cannot read ({e.strerror})") from None
    words = []
    for n, line in lines:
        if not line or line.startswith("#"):
            continue
        try:
            re.compile(line)
        except re.error as e:
            raise BadInput(f"{path}:{n}: {line!r} is not a regular expression ({e})") from None
        words.append(line)
    if not words:
        raise ConfigError("mask_words", path, "no words in the file")
    return words


def parse_side(value: str) -> list[str]:
    names = []
    for part in str(value).split(","):
        if not part.strip():
            continue
        try:
            names.append(normalise_profession(part))
        except ValueError:
            raise ConfigError("professions", value, f"{part!r} is not a profession name or index") from None
    if not names:
        raise ConfigError("professions", value, "empty side")
    return names


@dataclass
class Cells:
    """The split of the bios into the sets SHIFT uses. Labels: 0 = side A, 1 = side B."""

    side_a: list[str]
    side_b: list[str]
    genders: tuple[str, str]  # gender paired with A and with B in the ambiguous set
    train_ambiguous: list[int] = field(default_factory=list)
    train_balanced: list[int] = field(default_factory=list)
    val: list[int] = field(default_factory=list)
    test: list[int] = field(default_factory=list)
    label: np.ndarray | None = None
    gender: np.ndarray | None = None  # 1 = female
    counts: dict = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, str]:
        return ",".join(self.side_a), ",".join(self.side_b)

    def cell_name(self, label: int, gender: int) -> str:
        return f"{self.names[label]}/{'female' if gender else 'male'}"


def build_cells(bios: list[Bio], side_a: list[str], side_b: list[str], seen: dict[str, int], *,
                pairing: str = "auto", test_fraction: float = 0.4, val_fraction: float = 0.2,
                max_per_cell: int | None = None, seed: int = 0, data_name: str = "--data") -> Cells:
    overlap = set(side_a) & set(side_b)
    if overlap:
        raise BadInput(f"--professions: {', '.join(sorted(overlap))} is on both sides")
    for name in side_a + side_b:
        if not seen.get(name):
            found = ", ".join(sorted(seen)) or "none"
            raise BadInput(f"--professions: no documents with profession {name!r} in {data_name} "
                           f"(professions found: {found})")
    if not 0 < test_fraction < 1 or not 0 < val_fraction < 1 or test_fraction + val_fraction >= 1:
        raise BadInput("--test-fraction and --val-fraction must be in (0, 1) and sum to less than 1")
    label = np.array([0 if b.profession in side_a else 1 for b in bios], dtype=np.int64)
    gender = np.array([1 if b.gender == "female" else 0 for b in bios], dtype=np.int64)
    names = (",".join(side_a), ",".join(side_b))
    members = {(y, g): [i for i in range(len(bios)) if label[i] == y and gender[i] == g]
               for y in (0, 1) for g in (1, 0)}
    for (y, g), idx in members.items():
        if not idx:
            raise BadInput(f"cell {names[y]}/{GENDERS[g]} is empty in {data_name}: SHIFT needs documents of "
                           "both genders for both sides")
    if pairing == "auto":
        female_a = min(len(members[0, 1]), len(members[1, 0]))
        male_a = min(len(members[0, 0]), len(members[1, 1]))
        pairing = "female-male" if female_a >= male_a else "male-female"
    if pairing not in ("female-male", "male-female"):
        raise BadInput(f"--pairing {pairing!r}: expected auto, female-male or male-female")
    gender_a = 1 if pairing == "female-male" else 0
    rng = random.Random(seed)
    for key in members:
        rng.shuffle(members[key])
        if max_per_cell:
            members[key] = members[key][:max_per_cell]
    smallest = min(len(v) for v in members.values())
    n_test = max(1, int(math.floor(smallest * test_fraction)))
    n_val = max(1, int(math.floor(smallest * val_fraction)))
    if n_test < 1 or n_val < 1 or smallest - n_test - n_val < 1:
        raise BadInput(f"too few documents: the smallest cell has {smallest}, which cannot give test, validation "
                       "and training documents (need at least 3 per cell, more for meaningful numbers)")
    cells = Cells(side_a, side_b, ("female" if gender_a else "male", "male" if gender_a else "female"),
                  label=label, gender=gender)
    rest = {}
    for key, idx in members.items():
        cells.test += idx[:n_test]
        cells.val += idx[n_test:n_test + n_val]
        rest[key] = idx[n_test + n_val:]
    correlated = [(0, gender_a), (1, 1 - gender_a)]
    n_ambiguous = min(len(rest[k]) for k in correlated)
    for key in correlated:
        cells.train_ambiguous += rest[key][:n_ambiguous]
    n_balanced = min(len(v) for v in rest.values())
    for key in rest:
        cells.train_balanced += rest[key][:n_balanced]
    cells.counts = {
        "available": {cells.cell_name(y, g): len(members[y, g]) for (y, g) in members},
        "train_ambiguous": {cells.cell_name(*k): n_ambiguous for k in correlated},
        "train_balanced_per_cell": n_balanced,
        "val_per_cell": n_val,
        "test_per_cell": n_test,
        "pairing": {names[0]: cells.genders[0], names[1]: cells.genders[1]},
    }
    return cells


# ---------------------------------------------------------------------------------------- activations

def pooled(acts: list) -> np.ndarray:
    return np.stack([a.mean(0).numpy() for a in acts]).astype(np.float64)


# ------------------------------------------------------------------------------------------------ probe

MARKS_LR = 1e-3
MARKS_STEPS = 100


class LinearProbe:
    """Logistic regression on standardised features, stored as one weight vector and bias on raw inputs."""

    def __init__(self, weight: np.ndarray, bias: float):
        self.weight = np.asarray(weight, dtype=np.float64)
        self.bias = float(bias)

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, c: float = 1.0, seed: int = 0, kind: str = "l2") -> "LinearProbe":
        """kind "l2": sklearn L2 logistic regression (inverse strength `c`) on standardised features.
        kind "marks": as Marks et al. train their SHIFT classifier, a bare linear layer on the raw pooled
        activations, binary cross-entropy, Adam, no regularisation, full batch (see `fit_marks`)."""
        if len(np.unique(y)) < 2:
            raise BadInput("a probe's training set has only one class")
        if kind == "marks":
            return cls.fit_marks(x, y, seed)
        from sklearn.linear_model import LogisticRegression

        mean = x.mean(0)
        scale = x.std(0)
        scale[scale < 1e-8] = 1.0
        model = LogisticRegression(C=c, max_iter=5000, random_state=seed)
        model.fit((x - mean) / scale, y)
        w = model.coef_[0] / scale
        return cls(w, float(model.intercept_[0] - (w * mean).sum()))

    @classmethod
    def fit_marks(cls, x: np.ndarray, y: np.ndarray, seed: int = 0) -> "LinearProbe":
        """Unregularised logistic regression by Adam (lr MARKS_LR, MARKS_STEPS full-batch steps) from a
        seeded nn.Linear initialisation. Early-stopped gradient descent from near zero follows the
        strongest direction that separates the training labels first, which is what makes such a probe
        lean on a spurious feature (gender) that separates the ambiguous set as well as profession does."""
        import torch

        generator = torch.Generator().manual_seed(seed)
        xt = torch.tensor(x, dtype=torch.float32)
        yt = torch.tensor(y, dtype=torch.float32)
        bound = 1.0 / math.sqrt(x.shape[1])  # nn.Linear's default initialisation
        w = ((torch.rand(x.shape[1], generator=generator) * 2 - 1) * bound).requires_grad_(True)
        b = ((torch.rand(1, generator=generator) * 2 - 1) * bound).requires_grad_(True)
        optimiser = torch.optim.Adam([w, b], lr=MARKS_LR)
        for _ in range(MARKS_STEPS):
            optimiser.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt)
            loss.backward()
            optimiser.step()
        return cls(w.detach().double().numpy(), float(b.detach()[0]))

    def logit(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight + self.bias

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (self.logit(x) > 0).astype(np.int64)

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float((self.predict(x) == y).mean())

    def mean_correct_probability(self, x: np.ndarray, y: np.ndarray) -> float:
        p = 1.0 / (1.0 + np.exp(-np.clip(self.logit(x), -50, 50)))
        return float(np.where(y == 1, p, 1 - p).mean())


def evaluate(probe: LinearProbe, x: np.ndarray, cells: Cells, idx: list[int]) -> dict:
    y = cells.label[idx]
    g = cells.gender[idx]
    pred = probe.predict(x)
    gender_of_class = np.array([1 if cells.genders[0] == "female" else 0, 1 if cells.genders[1] == "female" else 0])
    groups = {}
    for label in (0, 1):
        for gender in (1, 0):
            mask = (y == label) & (g == gender)
            groups[cells.cell_name(label, gender)] = float((pred[mask] == label).mean())
    return {"profession_accuracy": float((pred == y).mean()),
            "gender_accuracy": float((gender_of_class[pred] == g).mean()),
            "worst_group_accuracy": min(groups.values()),
            "group_accuracy": groups,
            "n": int(len(idx))}


# -------------------------------------------------------------------------------------- SAE statistics

@dataclass
class LatentStats:
    """Per-document pooled latent activations and per-latent summaries over the given documents."""

    pooled: np.ndarray          # [docs, d_sae] mean over tokens of f
    frequency: np.ndarray       # [d_sae] fraction of all tokens where f > 0
    train_mean: np.ndarray      # [d_sae] mean of f over the ambiguous training tokens
    top_values: np.ndarray      # [d_sae, K] largest activations seen
    top_tokens: np.ndarray      # [d_sae, K] their token ids


def latent_stats(sae, acts: list, token_lists: list, train_idx: list[int], keep_top: int = 32,
                 batch_docs: int = 32, device: str = "cpu") -> LatentStats:
    import torch

    d_sae = sae.d_sae
    n = len(acts)
    pooled_f = np.zeros((n, d_sae), dtype=np.float64)
    fires = torch.zeros(d_sae, dtype=torch.float64)
    train_sum = torch.zeros(d_sae, dtype=torch.float64)
    train_set = set(train_idx)
    n_tokens = 0
    n_train_tokens = 0
    top_v = torch.full((d_sae, keep_top), -math.inf)
    top_t = torch.zeros((d_sae, keep_top), dtype=torch.long)
    with torch.no_grad():
        for start in range(0, n, batch_docs):
            docs = range(start, min(n, start + batch_docs))
            x = torch.cat([acts[i] for i in docs]).to(device)
            ids = torch.tensor([t for i in docs for t in token_lists[i]], dtype=torch.long)
            f = sae.encode(x).double().cpu()
            offset = 0
            for i in docs:
                length = acts[i].shape[0]
                block = f[offset:offset + length]
                pooled_f[i] = block.mean(0).numpy()
                if i in train_set:
                    train_sum += block.sum(0)
                    n_train_tokens += length
                offset += length
            fires += (f > 0).sum(0)
            n_tokens += f.shape[0]
            k = min(keep_top, f.shape[0])
            values, rows = f.float().topk(k, dim=0)  # [k, d_sae]
            merged_v = torch.cat([top_v, values.T], dim=1)
            merged_t = torch.cat([top_t, ids[rows].T], dim=1)
            best = merged_v.topk(keep_top, dim=1)
            top_v = best.values
            top_t = merged_t.gather(1, best.indices)
    return LatentStats(pooled_f, (fires / max(n_tokens, 1)).numpy(), (train_sum / max(n_train_tokens, 1)).numpy(),
                       top_v.numpy(), top_t.numpy())


def slice_mask(frequency: np.ndarray, fraction: tuple[int, int] | None) -> np.ndarray:
    """Keep the most often active `num/den` of the latents (ties broken by index)."""
    d_sae = len(frequency)
    if fraction is None:
        return np.ones(d_sae, dtype=bool)
    num, den = fraction
    keep = max(1, int(round(d_sae * num / den)))
    order = np.lexsort((np.arange(d_sae), -frequency))[:keep]
    mask = np.zeros(d_sae, dtype=bool)
    mask[order] = True
    return mask


# -------------------------------------------------------------------------------------------- attribution

def attribute_latents(sae, probe: LinearProbe, acts: list, docs: list[int], signs: np.ndarray,
                      ablate_to: np.ndarray, mask: np.ndarray, batch_docs: int = 32,
                      device: str = "cpu") -> tuple[np.ndarray, float]:
    """Attribution patching through x = decode(f * mask) + err (err held fixed).

    Returns the per-latent scores (mean over `docs` of sum_t dM/df_tj * (ablate_to_j - f_tj), M the
    margin signs * logit; zero outside `mask`) and the largest |logit difference| between this spliced
    path and the probe on the original activations (0 up to float rounding)."""
    import torch

    weight = torch.tensor(probe.weight, dtype=torch.float64, device=device)
    mask_t = torch.tensor(mask, dtype=torch.float64, device=device)
    target = torch.tensor(ablate_to, dtype=torch.float64, device=device)
    sae64 = _double(sae, device)
    total = torch.zeros(sae.d_sae, dtype=torch.float64, device=device)
    max_diff = 0.0
    for start in range(0, len(docs), batch_docs):
        batch = docs[start:start + batch_docs]
        lengths = [acts[i].shape[0] for i in batch]
        width = max(lengths)
        x = torch.zeros(len(batch), width, sae.d_in, dtype=torch.float64, device=device)
        valid = torch.zeros(len(batch), width, 1, dtype=torch.float64, device=device)
        for b, i in enumerate(batch):
            x[b, :lengths[b]] = acts[i].double().to(device)
            valid[b, :lengths[b]] = 1.0
        with torch.no_grad():
            f_clean = sae64.encode(x) * mask_t
            err = x - sae64.decode(f_clean)
        f = f_clean.clone().requires_grad_(True)
        spliced = sae64.decode(f) + err
        pooled_x = (spliced * valid).sum(1) / valid.sum(1)
        logits = pooled_x @ weight + probe.bias
        with torch.no_grad():
            original = (x * valid).sum(1) / valid.sum(1) @ weight + probe.bias
            max_diff = max(max_diff, float((logits - original).abs().max()))
        sign = torch.tensor(signs[batch], dtype=torch.float64, device=device)
        (sign * logits).sum().backward()
        delta = (target - f.detach()) * mask_t * valid
        total += (f.grad * delta).sum((0, 1))
    return (total / max(len(docs), 1)).cpu().numpy(), max_diff


def _double(sae, device: str):
    import copy

    return copy.deepcopy(sae).to(device=device, dtype=__import__("torch").float64)


def neuron_attribution(probe: LinearProbe, x_pooled: np.ndarray, signs: np.ndarray,
                       ablate_to: np.ndarray) -> np.ndarray:
    """The same score for raw hook dimensions (exact: the probe is linear in them)."""
    return ((signs[:, None] * probe.weight[None, :]) * (ablate_to[None, :] - x_pooled)).mean(0)


# --------------------------------------------------------------------------------------------- ablation

def ablate_latents(x_pooled: np.ndarray, f_pooled: np.ndarray, latents: list[int], sae,
                   ablate_to: np.ndarray) -> np.ndarray:
    """Pooled activations after replacing f_j by ablate_to[j] at every token (error term kept)."""
    if not latents:
        return x_pooled.copy()
    w_dec = decoder_rows(sae)[latents] / sae.act_scale
    return x_pooled - (f_pooled[:, latents] - ablate_to[latents][None, :]) @ w_dec


def decoder_rows(sae) -> np.ndarray:
    """W_dec as float64 numpy, converted once per SAE (selection ablates thousands of times)."""
    cached = getattr(sae, "_shift_w_dec", None)
    if cached is None:
        cached = sae.W_dec.detach().double().cpu().numpy()
        sae._shift_w_dec = cached
    return cached


def ablate_neurons(x_pooled: np.ndarray, neurons: list[int], ablate_to: np.ndarray) -> np.ndarray:
    out = x_pooled.copy()
    if neurons:
        out[:, neurons] = ablate_to[neurons][None, :]
    return out


def gender_separation(gender_probe: LinearProbe, x: np.ndarray, y_gender: np.ndarray) -> tuple[float, float]:
    """(ROC AUC of the gender probe's logit, its accuracy) on `x`."""
    auc = roc_auc(gender_probe.logit(x), y_gender)
    # one gender only: nothing to separate, which counts as chance
    return 0.5 if auc is None else auc, gender_probe.accuracy(x, y_gender)


def _why_none_chosen(candidates: list[int], steps: list[dict], cfg) -> str:
    """Why the auto rule ablated nothing, in the options' words."""
    if not candidates:
        return "no latent in the --slice has a non-zero attribution to the profession probe"
    if steps[0]["gender_auc"] <= 0.5:
        return (f"the gender probe does not separate the genders on the validation set before any ablation "
                f"(AUC {steps[0]['gender_auc']:.3f})")
    return (f"no single latent among the top {len(candidates)} attributed lowers the gender probe's validation "
            f"AUC ({steps[0]['gender_auc']:.3f}) by --auto-min-drop {cfg.auto_min_drop} or more")


def greedy_gender_selection(candidates: list[int], ablate_fn, gender_probe: LinearProbe, y_gender: np.ndarray,
                            max_selected: int, min_drop: float = 0.01) -> tuple[list[int], list[dict]]:
    """Among `candidates`, repeatedly add the one whose ablation (with those already chosen) most lowers
    how well the fixed gender probe separates the genders on the validation set, while that drops by at
    least `min_drop`. `ablate_fn(chosen)` gives the ablated validation activations.

    Separation is measured threshold-free (ROC AUC of the probe's logit; ties: the lower accuracy):
    ablating one side of a signal (e.g. only a "she" latent) shifts every logit one way and can bring
    the plain accuracy to chance while the genders stay perfectly separable."""
    chosen: list[int] = []
    auc, accuracy = gender_separation(gender_probe, ablate_fn([]), y_gender)
    steps = [{"latent": None, "gender_auc": auc, "gender_accuracy": accuracy}]
    remaining = list(candidates)
    while remaining and len(chosen) < max_selected and auc > 0.5:
        best = None
        for c in remaining:
            score = gender_separation(gender_probe, ablate_fn(chosen + [c]), y_gender)
            if best is None or score < best[0]:
                best = (score, c)
        if auc - best[0][0] < min_drop:
            break
        chosen.append(best[1])
        remaining.remove(best[1])
        auc, accuracy = best[0]
        steps.append({"latent": int(best[1]), "gender_auc": auc, "gender_accuracy": accuracy})
    return chosen, steps


# ----------------------------------------------------------------------------------------------- report

def row(method: str, sae_name: str | None, metrics: dict, ablated_latents=None, ablated_neurons=None) -> dict:
    out = {"method": method, "sae": sae_name, **metrics, "ablated_latents": ablated_latents or []}
    if ablated_neurons is not None:
        out["ablated_neurons"] = ablated_neurons
    return out


METRICS = ("profession_accuracy", "gender_accuracy", "worst_group_accuracy")


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for a single value)."""
    v = np.asarray(list(values), dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def aggregate_rows(splits: list[list[dict]]) -> list[dict]:
    """One row per method with the mean over splits of every number and its sd beside it (`NAME_sd`);
    `ablated_count` is the mean number of latents (or neurons) ablated."""
    methods = [r["method"] for r in splits[0]]
    for rows in splits[1:]:
        if [r["method"] for r in rows] != methods:
            raise ValueError("splits with different rows cannot be aggregated")
    out = []
    for k, method in enumerate(methods):
        rows = [split[k] for split in splits]
        agg = {"method": method, "sae": rows[0]["sae"], "splits": len(rows), "n": rows[0]["n"]}
        for name in METRICS:
            agg[name], agg[name + "_sd"] = mean_sd(r[name] for r in rows)
        cells = list(rows[0]["group_accuracy"])
        pairs = {c: mean_sd(r["group_accuracy"][c] for r in rows) for c in cells}
        agg["group_accuracy"] = {c: m for c, (m, _) in pairs.items()}
        agg["group_accuracy_sd"] = {c: sd for c, (_, sd) in pairs.items()}
        agg["ablated_count"], agg["ablated_count_sd"] = mean_sd(
            len(r.get("ablated_neurons") or r.get("ablated_latents") or []) for r in rows)
        out.append(agg)
    return out


def paired_differences(splits: list[list[dict]], metric: str = "worst_group_accuracy") -> list[dict]:
    """Per-split differences of `metric` (mean, sd and the values): every SAE's shift and shift+retrain
    row against the original probe, and every other SAE against the first SAE, row kind by row kind."""
    def value(rows, method):
        return next(r[metric] for r in rows if r["method"] == method)

    saes = list(dict.fromkeys(r["sae"] for r in splits[0] if r["sae"]))
    pairs = [(f"{kind}:{sae}", "original") for sae in saes for kind in ("shift", "shift+retrain")]
    pairs += [(f"{kind}:{sae}", f"{kind}:{saes[0]}") for sae in saes[1:] for kind in ("shift", "shift+retrain")]
    out = []
    for a, b in pairs:
        values = [value(rows, a) - value(rows, b) for rows in splits]
        mean, sd = mean_sd(values)
        out.append({"a": a, "b": b, "metric": metric, "mean": mean, "sd": sd, "values": values})
    return out


def ablated_summary(split_details: list[list[dict]], tokenizer_free_top: int = 6) -> dict[str, list[dict]]:
    """Per SAE, every latent ablated in some split: in how many splits, and its top tokens (from the
    first split that ablated it)."""
    out: dict[str, dict[int, dict]] = {}
    for details in split_details:
        for d in details:
            latents = out.setdefault(d["name"], {})
            tokens = {t["latent"]: t["top_tokens"] for t in d["top_latents"]}
            for j in d["ablated_latents"]:
                entry = latents.setdefault(j, {"latent": j, "splits": 0,
                                                "top_tokens": [t["token"] for t in tokens.get(j, [])][:tokenizer_free_top]})
                entry["splits"] += 1
    return {name: sorted(v.values(), key=lambda e: (-e["splits"], e["latent"])) for name, v in out.items()}


def gender_left_summary(split_details: list[list[dict]]) -> dict[str, dict]:
    """Per SAE, the mean and sd over splits of the gender probe's test accuracy on the activations and
    with every latent ablated (`gender_test_accuracy` of each split's SAE details)."""
    out: dict[str, dict] = {}
    for name in [d["name"] for d in split_details[0]]:
        values = [next(d for d in details if d["name"] == name)["gender_test_accuracy"] for details in split_details]
        out[name] = {}
        for key in ("activations", "every_latent_ablated"):
            mean, sd = mean_sd(v[key] for v in values)
            out[name][key], out[name][key + "_sd"] = mean, sd
    return out


def _pct(row: dict, name: str, key: str | None = None) -> str:
    value = row[name] if key is None else row[name][key]
    sd = row.get(name + "_sd")
    if sd is None:
        return f"{100 * value:.1f}"
    return f"{100 * value:.1f}±{100 * (sd if key is None else sd[key]):.1f}"


def format_table(report: dict) -> str:
    """The rows as text; with several splits every number is mean±sd over them, followed by the
    original probe's check, the paired differences and the ablated latents."""
    rows = report["rows"]
    cells = list(rows[0]["group_accuracy"]) if rows else []
    header = ["method", "prof", "gender", "worst"] + cells + ["n", "ablated"]
    lines = [header]
    for r in rows:
        if "ablated_count" in r:
            ablated = f"{r['ablated_count']:.1f}" if r["splits"] > 1 else f"{r['ablated_count']:.0f}"
        else:
            ablated = str(len(r.get("ablated_neurons") or r.get("ablated_latents") or []))
        lines.append([r["method"], _pct(r, "profession_accuracy"), _pct(r, "gender_accuracy"),
                      _pct(r, "worst_group_accuracy")]
                     + [_pct(r, "group_accuracy", c) for c in cells] + [str(r["n"]), ablated])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = []
    if "splits" in report:
        professions = report.get("professions", {})
        title = f"SHIFT, {','.join(professions.get('A', []))} vs {','.join(professions.get('B', []))}: " \
                f"mean±sd over {len(report['splits'])} split(s), probe {report.get('probe')}"
        mask = report.get("mask")
        text.append(title + (f"; {mask['replacements']} words masked" if mask else ""))
    text += ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths)))
             for line in lines]
    original = next((r for r in rows if r["method"] == "original"), None)
    if original is not None and "splits" in report:
        text.append(f"check: the original probe's gender accuracy on the balanced test set "
                    f"{_pct(original, 'gender_accuracy')}, worst group {_pct(original, 'worst_group_accuracy')} "
                    "(a confound shows as gender accuracy well above 50 and a low worst group)")
    for d in report.get("differences", []):
        text.append(f"difference in worst group, {d['a']} - {d['b']}: {100 * d['mean']:+.1f} ± {100 * d['sd']:.1f} "
                    "(mean ± sd over splits)")
    for name, left in report.get("gender_left", {}).items():
        text.append(f"gender left in {name}: a gender probe reaches {_pct(left, 'activations')} on the test set's "
                    f"activations and {_pct(left, 'every_latent_ablated')} with every latent ablated (the error "
                    "term: what no choice of latents removes)")
    for name, latents in report.get("ablated", {}).items():
        shown = "; ".join(f"{e['latent']} [{e['splits']}x] {' '.join(repr(t) for t in e['top_tokens'])}"
                          for e in latents[:12])
        text.append(f"ablated in {name} ({len(latents)} latents over all splits): {shown or 'none'}")
    return "\n".join(text)


def read_explanations(path: str) -> dict[int, str]:
    """latent -> explanation from ssae-explain output (explanations.jsonl, or the folder holding it)."""
    if os.path.isdir(path):
        path = os.path.join(path, "explanations.jsonl")
    out = {}
    for obj, source in iter_raw(path):
        if not isinstance(obj, dict) or "latent" not in obj:
            raise BadInput(f"{source}: expected an ssae.explanation/1 record with a 'latent' field")
        try:
            out[int(obj["latent"])] = obj.get("explanation")
        except (TypeError, ValueError):
            raise BadInput(f"{source}: field 'latent' is {obj['latent']!r}, expected an integer") from None
    return out


def decode_token(tokenizer, token_id: int) -> str:
    try:
        return tokenizer.decode([int(token_id)])
    except Exception:
        return str(token_id)


def top_tokens_of(stats: LatentStats, latent: int, tokenizer, n: int = 8) -> list[dict]:
    out, seen = [], set()
    for value, tid in zip(stats.top_values[latent], stats.top_tokens[latent]):
        if not np.isfinite(value) or value <= 0 or tid in seen:
            continue
        seen.add(tid)
        out.append({"token": decode_token(tokenizer, tid), "activation": round(float(value), 4)})
        if len(out) == n:
            break
    return out


# -------------------------------------------------------------------------------------------------- run

@dataclass
class SaeSpec:
    name: str
    path: str
    sae: object
    latents: list[int] | None  # the latents to ablate; None: chosen by the auto rule
    explanations: dict[int, str] | None = None


def run_shift(acts: list, token_lists: list, cells: Cells, saes: list[SaeSpec], tokenizer, cfg: ShiftConfig, *,
              seed: int = 0, device: str = "cpu") -> dict:
    """Everything after the LM pass; returns the report body (rows, per-SAE details, cell counts)."""
    fraction = slice_fraction(cfg.slice)
    x = pooled(acts)
    train, balanced, val, test = cells.train_ambiguous, cells.train_balanced, cells.val, cells.test
    signs = np.where(cells.label == 1, 1.0, -1.0)
    probe = LinearProbe.fit(x[train], cells.label[train], cfg.probe_c, seed, cfg.probe)
    oracle = LinearProbe.fit(x[balanced], cells.label[balanced], cfg.probe_c, seed, cfg.probe)
    # the gender probe is a detector for `auto`, not part of the experiment: always the regularised one
    gender_probe = LinearProbe.fit(x[balanced], cells.gender[balanced], cfg.probe_c, seed)
    gender_val = cells.gender[val]
    rows = [row("original", None, evaluate(probe, x[test], cells, test)),
            row("oracle", None, evaluate(oracle, x[test], cells, test))]

    details = []
    per_sae_rows = []
    max_ablated = 0
    for spec in saes:
        sae = spec.sae
        stats = latent_stats(sae, acts, token_lists, train, device=device)
        mask = slice_mask(stats.frequency, fraction)
        ablate_to = stats.train_mean if cfg.ablation == "mean" else np.zeros(sae.d_sae)
        scores, max_diff = attribute_latents(sae, probe, acts, train, signs, ablate_to, mask, device=device)
        ranked = [int(j) for j in np.lexsort((np.arange(sae.d_sae), -np.abs(scores))) if mask[j]]
        candidates = [j for j in ranked[:cfg.top] if scores[j] != 0]

        def ablate_val(chosen, _stats=stats, _sae=sae, _to=ablate_to):
            return ablate_latents(x[val], _stats.pooled[val], chosen, _sae, _to)

        note = None
        if spec.latents is None:
            chosen, steps = greedy_gender_selection(candidates, ablate_val, gender_probe, gender_val, cfg.auto_max,
                                                    cfg.auto_min_drop)
            if not chosen:
                note = _why_none_chosen(candidates, steps, cfg)
                log.warning("--ablate auto chose no latent of %s: %s", spec.name, note)
        else:
            chosen = list(spec.latents)
            outside = [j for j in chosen if not mask[j]]
            if outside:
                raise ConfigError("ablate", ",".join(map(str, chosen)),
                                  f"latent {outside[0]} of {spec.name} is not in the --slice "
                                  f"{fraction[0]}/{fraction[1]} (the most active latents)")
            steps = []
            for latent, ablated in ((None, []), (chosen, chosen)):
                auc, accuracy = gender_separation(gender_probe, ablate_val(ablated), gender_val)
                steps.append({"latent": latent, "gender_auc": auc, "gender_accuracy": accuracy})
        max_ablated = max(max_ablated, len(chosen))
        x_abl = ablate_latents(x, stats.pooled, chosen, sae, ablate_to)
        # what no choice of latents can remove: a gender probe retrained with every candidate ablated
        # (the error term, plus latents outside the slice) against one on the activations
        x_none = ablate_latents(x, stats.pooled, [int(j) for j in np.flatnonzero(mask)], sae, ablate_to)
        gender_left = {"activations": gender_probe.accuracy(x[test], cells.gender[test]),
                       "every_latent_ablated": LinearProbe.fit(x_none[balanced], cells.gender[balanced], cfg.probe_c,
                                                               seed).accuracy(x_none[test], cells.gender[test])}
        retrained = LinearProbe.fit(x_abl[train], cells.label[train], cfg.probe_c, seed, cfg.probe)
        per_sae_rows.append(row(f"shift:{spec.name}", spec.name, evaluate(probe, x_abl[test], cells, test), chosen))
        per_sae_rows.append(row(f"shift+retrain:{spec.name}", spec.name,
                                evaluate(retrained, x_abl[test], cells, test), chosen))
        shown = list(dict.fromkeys(chosen + ranked[:cfg.show]))
        top = []
        for j in shown:
            entry = {"latent": j, "attribution": float(scores[j]), "frequency": float(stats.frequency[j]),
                     "ablated": j in chosen, "top_tokens": top_tokens_of(stats, j, tokenizer)}
            if spec.explanations is not None:
                entry["explanation"] = spec.explanations.get(j)
            top.append(entry)
        details.append({"name": spec.name, "path": os.path.abspath(spec.path), "d_sae": sae.d_sae,
                        "architecture": sae.architecture, "latents_considered": int(mask.sum()),
                        "selection": "auto" if spec.latents is None else "list",
                        "ablated_latents": chosen, "selection_trace": steps, "selection_note": note,
                        "clean_logit_max_abs_diff": max_diff, "gender_test_accuracy": gender_left,
                        "top_latents": top})

    neuron_to = x[train].mean(0) if cfg.ablation == "mean" else np.zeros(x.shape[1])
    neuron_scores = neuron_attribution(probe, x[train], signs[train], neuron_to)
    neuron_ranked = [int(j) for j in np.lexsort((np.arange(x.shape[1]), -np.abs(neuron_scores)))]
    if all(s.latents is None for s in saes):
        neurons, neuron_steps = greedy_gender_selection(
            neuron_ranked[:cfg.top], lambda chosen: ablate_neurons(x[val], chosen, neuron_to), gender_probe,
            gender_val, cfg.auto_max, cfg.auto_min_drop)
        neuron_rule = "auto"
    else:
        neurons = neuron_ranked[:max_ablated]
        neuron_steps = None
        neuron_rule = f"top {max_ablated} by attribution"
    rows.append(row("neuron_skyline", None, evaluate(probe, ablate_neurons(x[test], neurons, neuron_to), cells, test),
                    [], neurons))
    rows.extend(per_sae_rows)
    return {"rows": rows, "saes": details,
            "neuron_skyline": {"selection": neuron_rule, "ablated_neurons": neurons,
                               "selection_trace": neuron_steps},
            "probes": {"profession_train_accuracy": probe.accuracy(x[train], cells.label[train]),
                       "gender_probe_val_accuracy": gender_probe.accuracy(x[val], gender_val)}}
