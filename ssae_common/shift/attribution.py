"""Which SAE latents a probe relies on: latent statistics, attribution patching, ablation (of latents
and of raw hook dimensions) and the greedy gender selection, with the explanations and top tokens that
label a latent in the report."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np

from ..core.errors import BadInput
from ..core.records import iter_raw
from .probe import LinearProbe
from ..core.stats import roc_auc

log = logging.getLogger("ssae")


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


def why_none_chosen(candidates: list[int], steps: list[dict], cfg) -> str:
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
