"""Spliced-in language-model evaluation: next-token cross-entropy with the hook point replaced by an
SAE's reconstruction, against the clean model and against zero ablation of the hook.

Documents are windowed exactly as ssae-harvest does (harvest.iter_windows: windows of
`context_size - 1` tokens after BOS). Per batch of windows:

1. one clean forward pass with a capture hook gives the clean logits and the hook activations;
2. zero ablation: the hook output zeroed at the spliced positions;
3. per SAE, the hook output replaced by the SAE reconstruction of the clean activations at the spliced
   positions (the run upstream of the hook is unchanged, so encoding the captured activations once gives
   exactly what the hook sees).

Passes 2 and 3 share the clean pass's prefix: when the hook is on the residual stream between blocks
(hook_resid_pre / hook_resid_post), they rerun only the layers above it from the replaced residual
(data.models.Suffix), and unembed only the positions that are scored; the first batch of a loaded model
at a hook checks that the rerun reproduces the clean logits. Other hooks, or a model failing that check,
fall back to a whole forward pass each. Both give the same numbers to float rounding (tests/test_eval_split.py).

Spliced positions are the real (non-padding) positions after BOS; BOS itself is left clean unless
`splice_bos` (harvest drops BOS by default, so SAEs are not trained on it). The activation-based
metrics use the same positions as the rows a default harvest stores, so `--docs` and `--activations`
over the same documents agree.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from ..data.harvester import HarvestConfig, _batches, _Counter, iter_windows
from ..core.progress import Progress

log = logging.getLogger("ssae")


@dataclass
class DocsEvalConfig:
    hook: str
    context_size: int = 128
    batch_size: int = 8
    max_tokens: int | None = None
    splice_bos: bool = False
    shared_prefix: bool = True  # False: every pass a whole forward pass (the benchmark's reference)


@dataclass
class WindowBatch:
    tokens: torch.Tensor      # [B, T] long
    real: torch.Tensor        # [B, T] bool: not padding
    act_pos: torch.Tensor     # [B, T] bool: positions whose activations are evaluated (no BOS)
    splice_pos: torch.Tensor  # [B, T] bool: positions replaced in the spliced / ablated runs
    n_windows: int


def window_batches(lm, docs: Iterable, cfg: DocsEvalConfig, skip_windows: int = 0,
                   token_budget: int | None = None, counter: _Counter | None = None) -> Iterator[WindowBatch]:
    """Padded token batches over the documents' windows (harvest's windowing), skipping the first
    `skip_windows` windows and stopping after `token_budget` evaluated (non-BOS) tokens."""
    hcfg = HarvestConfig(hook=cfg.hook, context_size=cfg.context_size, batch_size=cfg.batch_size)
    hcfg.check()
    windows = iter_windows(lm, docs, hcfg, {"next_input_doc": 0, "next_window": 0}, counter or _Counter())
    prefix = lm.with_bos([])
    budget = token_budget
    for batch in _batches(itertools.islice(windows, skip_windows, None), cfg.batch_size):
        seqs = []
        for w in batch:
            toks = w.tokens if budget is None else w.tokens[:budget]
            if not toks:
                break
            seqs.append(prefix + toks)
            if budget is not None:
                budget -= len(toks)
        if not seqs:
            return
        tokens = lm.padded(seqs)
        length = tokens.shape[1]
        lengths = torch.tensor([len(s) for s in seqs])
        pos = torch.arange(length)[None, :]
        real = pos < lengths[:, None]
        act_pos = real & (pos >= len(prefix))
        splice_pos = real if cfg.splice_bos else act_pos
        yield WindowBatch(tokens, real, act_pos, splice_pos, len(seqs))
        if budget is not None and budget <= 0:
            return


def scored_positions(real: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the real positions that have a real successor, whose next-token loss is scored."""
    pred = torch.zeros_like(real)
    pred[:, :-1] = real[:, 1:]
    return pred


def next_token_ce(logits: torch.Tensor, tokens: torch.Tensor, real: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy (nats) over the real positions that have a real successor."""
    pred = scored_positions(real)
    return summed_ce(logits[pred], tokens[:, 1:][real[:, 1:]])


def summed_ce(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """Summed cross-entropy of [n, vocab] logits against [n] targets, and n."""
    if targets.shape[0] == 0:
        return 0.0, 0
    return float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")), int(targets.shape[0])


def _replace(mask: torch.Tensor, values: torch.Tensor | None):
    """A hook fn writing `values` (or zeros) into the hook output at `mask`."""

    def fn(x, hook):
        out = x.clone()
        # attn.hook_z is [batch, seq, heads, d_head]: its rows were encoded with the heads concatenated
        out[mask] = 0 if values is None else values.to(out.dtype).reshape(-1, *out.shape[2:])
        return out

    return fn


def replaced_pass(lm, tokens: torch.Tensor, hook: str, acts: torch.Tensor, suffix, mask: torch.Tensor,
                  pred: torch.Tensor):
    """A function of `values` (None: zeros) giving the [n_scored, vocab] logits at `pred` with the hook
    output replaced at `mask`: through `suffix` from the captured activations `acts` when the hook splits
    the model, else a whole forward pass."""
    if suffix is None:
        @torch.no_grad()
        def full(values):
            return lm.bridge.run_with_hooks(tokens, fwd_hooks=[(hook, _replace(mask, values))])[pred]

        return full

    def rerun(values):
        return suffix(_replace(mask, values)(acts, hook), pred)

    return rerun


@torch.no_grad()
def evaluate_docs(lm, saes: list, docs: Iterable, cfg: DocsEvalConfig, state, stop=None, quiet: bool = False,
                  save=None) -> None:
    """Run the LM over `docs`, filling `state` (metrics.EvalState): LM scores and every SAE's
    activation metrics. `saes` is a list of (name, SAE). Resumes after `state.done` windows."""
    device = lm.device
    counter = _Counter()
    budget = None if cfg.max_tokens is None else cfg.max_tokens - state.n_tokens
    if budget is not None and budget <= 0:
        return
    shared = cfg.shared_prefix and lm.suffix_checked.get(cfg.hook, True)
    if shared and lm.resume_layer(cfg.hook) is None:
        log.info("%s is not between blocks: every spliced pass runs the whole model", cfg.hook)
        shared = False
    batches = window_batches(lm, docs, cfg, skip_windows=state.done, token_budget=budget, counter=counter)
    with Progress("eval", total=cfg.max_tokens, unit="tokens", quiet=quiet) as progress:
        progress.done = state.n_tokens
        for wb in batches:
            tokens = wb.tokens.to(device)
            real, act_pos, splice_pos = wb.real.to(device), wb.act_pos.to(device), wb.splice_pos.to(device)
            pred, targets = scored_positions(real), tokens[:, 1:][real[:, 1:]]
            logits, acts, suffix = lm.split_run(tokens, cfg.hook)
            if shared and cfg.hook not in lm.suffix_checked:  # the first batch of this model at this hook
                shared = lm.suffix_checked[cfg.hook] = suffix.matches(acts, logits, pred)
                if not shared:
                    log.warning("rerunning the layers above %s does not reproduce %s's logits: every spliced pass "
                                "runs the whole model", cfg.hook, lm.name)
            ce, n_pred = summed_ce(logits[pred], targets)
            del logits
            state.lm.clean += ce
            state.lm.n += n_pred
            replaced = replaced_pass(lm, tokens, cfg.hook, acts, suffix if shared else None, splice_pos, pred)
            state.lm.zero += summed_ce(replaced(None), targets)[0]
            x_splice = acts[splice_pos].float()
            token_ids = wb.tokens[wb.act_pos].numpy()
            # act_pos is a subset of splice_pos: pick the activation rows out of the spliced rows
            sub = act_pos[splice_pos]
            for name, sae in saes:
                x_hat, f = sae(x_splice)
                state.lm.spliced[name] += summed_ce(replaced(x_hat), targets)[0]
                state.acc[name].update(x_splice[sub], x_hat[sub], f[sub], token_ids)
            state.done += wb.n_windows
            state.n_tokens += len(token_ids)
            progress.update(len(token_ids))
            if stop is not None:
                stop.check(save)
    state.n_short_docs = counter.short
