"""Bias in Bios for SHIFT: reading the records (names and LabHC indices), masking profession words, and
the seeded split into the four profession x gender cells (see shift.method for the whole method)."""
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

log = logging.getLogger("ssae")


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
        raise ConfigError("professions", None, f"{', '.join(sorted(overlap))} is on both sides")
    for name in side_a + side_b:
        if not seen.get(name):
            found = ", ".join(sorted(seen)) or "none"
            raise ConfigError("professions", None, f"no documents with profession {name!r} in {data_name} "
                                                   f"(professions found: {found})")
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
