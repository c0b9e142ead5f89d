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

import logging
import os
from dataclasses import dataclass

import numpy as np

from ..core.config import ConfigError
from .attribution import (ablate_latents, ablate_neurons, attribute_latents, gender_separation,
                          greedy_gender_selection, latent_stats, neuron_attribution, slice_mask, top_tokens_of,
                          why_none_chosen)
from .bios import Cells
from .config import ShiftConfig, slice_fraction
from .probe import LinearProbe, pooled, probe_accuracies
from .report import row

log = logging.getLogger("ssae")


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
    rows = [row("original", None, probe_accuracies(probe, x[test], cells, test)),
            row("oracle", None, probe_accuracies(oracle, x[test], cells, test))]

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
                note = why_none_chosen(candidates, steps, cfg)
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
        per_sae_rows.append(row(f"shift:{spec.name}", spec.name, probe_accuracies(probe, x_abl[test], cells, test), chosen))
        per_sae_rows.append(row(f"shift+retrain:{spec.name}", spec.name,
                                probe_accuracies(retrained, x_abl[test], cells, test), chosen))
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
    rows.append(row("neuron_skyline", None, probe_accuracies(probe, ablate_neurons(x[test], neurons, neuron_to), cells, test),
                    [], neurons))
    rows.extend(per_sae_rows)
    return {"rows": rows, "saes": details,
            "neuron_skyline": {"selection": neuron_rule, "ablated_neurons": neurons,
                               "selection_trace": neuron_steps},
            "probes": {"profession_train_accuracy": probe.accuracy(x[train], cells.label[train]),
                       "gender_probe_val_accuracy": gender_probe.accuracy(x[val], gender_val)}}
