"""Documents -> activations at one hook point, streamed to an HDF5 file with bounded memory.

Each document is tokenised without special tokens and cut into windows of `context_size - 1` tokens,
each prefixed by BOS (when the tokenizer has one, unless --no-bos), so every window starts like a fresh
sequence.
Windows are right-padded into batches; the model is causal, so padding never changes real positions.
The forward pass stops after the hooked layer.

A document contributes at most its first `max_tokens_per_doc` tokens (the cut comes before the
windows).  With `spread`, the stage sets that cap from a first pass over the inputs: the largest c with
sum_i stored(min(len_i, c)) <= max_tokens, so the budget reaches every document (stored(n) is n, plus
one BOS row per window when BOS is kept).

This is the harvest loop on a loaded model; `data.stage.harvest` is the whole stage (options, default
output and reuse, provenance, model loading).
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from .activations import ActivationStore, ActivationWriter, activation_artifact
from .composition import Composition, describe, source_of
from .config import HarvestConfig
from ..core.errors import BadInput
from ..core.outputs import check_target, exclusive, is_full_disk, no_space, partial_path, refuse_link
from ..core.progress import Progress
from ..core.records import Source
from ..core.signals import StopFlag

log = logging.getLogger("ssae")


@dataclass
class Window:
    input_index: int
    window: int
    doc: dict
    tokens: list[int]
    cut: bool  # the document was longer than the per-document cap


class _Counter:
    short = 0


PREFIX_MARGIN = 64  # tokens read past a document's cap: the tokens before them do not depend on where the text was cut


def token_cap(cfg: HarvestConfig) -> int:
    """The most tokens of one document a harvest can store (0: no bound)."""
    caps = [c for c in (cfg.max_tokens_per_doc, cfg.max_tokens) if c]
    return min(caps) if caps else 0


def tokenize_prefix(model, text: str, cap: int) -> tuple[list[int], str]:
    """The tokens of `text` up to one past `cap` (all of them when `cap` is 0 or the text is short), and the
    prefix of the text they come from.  A long document is tokenised in growing prefixes, never whole: a
    50 MB line costs what its first tokens cost."""
    if cap:
        chars = (cap + PREFIX_MARGIN) * 8
        while chars < len(text):
            tokens = model.tokenize(text[:chars])
            if len(tokens) > cap + PREFIX_MARGIN:
                return tokens[:cap + 1], text[:chars]
            chars *= 4
    return model.tokenize(text), text


def iter_windows(model, docs: Iterable[tuple[dict, Source]], cfg: HarvestConfig, start: dict,
                 counter: _Counter) -> Iterator[Window]:
    shard_i, shard_n = cfg.shard_index
    span = cfg.context_size - (1 if model.prepends_bos else 0)
    cap = token_cap(cfg)
    for input_index, (doc, _source) in enumerate(docs):
        if input_index % shard_n != shard_i or input_index < start["next_input_doc"]:
            continue
        tokens, text = tokenize_prefix(model, doc["text"], cap)
        if len(text) < len(doc["text"]):
            doc = {**doc, "text": text}  # what is stored: the part of the text the stored tokens come from
        if len(tokens) < cfg.min_tokens:
            counter.short += 1
            continue
        cut = bool(cfg.max_tokens_per_doc) and len(tokens) > cfg.max_tokens_per_doc
        if cut:
            tokens = tokens[:cfg.max_tokens_per_doc]
        first = start["next_window"] if input_index == start["next_input_doc"] else 0
        for w, s in enumerate(range(0, len(tokens), span)):
            if w >= first:
                yield Window(input_index, w, doc, tokens[s:s + span], cut)


def document_lengths(model, docs: Iterable[tuple[dict, Source]], cfg: HarvestConfig) -> list[int]:
    """Tokens of every document this run would harvest (its shard, none shorter than min_tokens)."""
    shard_i, shard_n = cfg.shard_index
    lengths = []
    for input_index, (doc, _source) in enumerate(docs):
        if input_index % shard_n == shard_i:
            n = len(tokenize_prefix(model, doc["text"], token_cap(cfg))[0])
            if n >= cfg.min_tokens:
                lengths.append(n)
    return lengths


def spread_cap(lengths: list[int], budget: int, cap: int, window: int, bos_rows: bool) -> int:
    """The largest per-document cap, at most `cap` (0: none), under which all documents of `lengths`
    store at most `budget` tokens; `cap` when they fit anyway, and 1 when not even one token each fits.
    `window` tokens of a document go in one window, which stores one BOS row more when `bos_rows`."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(lengths):
        return cap

    def stored(c: int) -> int:
        n = np.minimum(lengths, c)
        windows = -(-n // window)
        return int(n.sum() + (windows.sum() if bos_rows else 0))

    hi = int(lengths.max()) if not cap else min(cap, int(lengths.max()))
    if stored(hi) <= budget:
        return cap
    lo = 1
    while lo < hi:  # stored() grows with c: find the largest c with stored(c) <= budget
        mid = (lo + hi + 1) // 2
        if stored(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _batches(windows: Iterator[Window], size: int) -> Iterator[list[Window]]:
    batch = []
    for w in windows:
        batch.append(w)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_batch(writer, ids, texts, inputs, acts, token_ids, doc_rows, positions, checkpoint) -> None:
    writer.reserve(len(token_ids), sum(len(t) for t in texts) * 4)  # UTF-8: at most 4 bytes a character
    if ids:
        writer.add_docs(ids, texts, inputs)
    writer.add_rows(acts, token_ids, doc_rows, positions)
    writer.checkpoint(**checkpoint)


def harvest_into(model, docs: Iterable[tuple[dict, Source]], writer: ActivationWriter, cfg: HarvestConfig,
                 stop: StopFlag, quiet: bool = False) -> dict:
    """Fill `writer` from `docs`, checkpointing after every batch. Returns a summary."""
    import torch

    state = writer.resume_state
    counter = _Counter()
    counter.short = int(state.get("n_short", 0))
    skip = 1 if (model.prepends_bos and cfg.drop_bos) else 0
    n_docs = writer.n_docs
    last_input = state.get("last_input_doc", -1)  # input index of the newest doc row
    composition = Composition(state.get("composition"))
    budget = (cfg.max_tokens - writer.n_tokens) if cfg.max_tokens else None
    if budget is not None and budget <= 0:
        return {"n_short": counter.short, "composition": composition}

    io = ThreadPoolExecutor(max_workers=1)
    writing = io.submit(lambda: None)
    with io, Progress("harvest", total=cfg.max_tokens, unit="tokens", quiet=quiet) as progress:
        progress.done = writer.n_tokens
        for batch in _batches(iter_windows(model, docs, cfg, state, counter), cfg.batch_size):
            seqs = [model.with_bos(w.tokens) for w in batch]
            acts = model.activations(model.padded(seqs).to(model.device), cfg.hook).float().cpu()

            rows, tok_ids, doc_rows, positions = [], [], [], []
            new_ids, new_texts, new_inputs = [], [], []
            done = False
            for b, (w, s) in enumerate(zip(batch, seqs)):
                take = len(s) - skip
                if budget is not None:
                    take = min(take, budget)
                if take <= 0:
                    done = True
                    break
                if w.input_index != last_input:
                    new_ids.append(w.doc["id"])
                    new_texts.append(w.doc["text"])
                    new_inputs.append(w.input_index)
                    last_input = w.input_index
                    n_docs += 1
                composition.add(n_docs - 1, w.doc["id"], source_of(w.doc), take, w.cut)
                rows.append(acts[b, skip:skip + take])
                tok_ids.extend(s[skip:skip + take])
                doc_rows.extend([n_docs - 1] * take)
                positions.extend(range(skip, skip + take))
                if budget is not None:
                    budget -= take
                    if budget == 0:
                        done = True
                        break
            if rows:
                # write in the background while the next batch runs through the model
                writing.result()
                last = batch[-1]
                writing = io.submit(_write_batch, writer, new_ids, new_texts, new_inputs, torch.cat(rows),
                                    np.asarray(tok_ids, dtype=np.int32), np.asarray(doc_rows, dtype=np.int32),
                                    np.asarray(positions, dtype=np.int32),
                                    dict(n_docs=n_docs, next_input_doc=last.input_index, next_window=last.window + 1,
                                         n_short=counter.short, last_input_doc=last_input,
                                         composition=composition.state()))
                progress.update(len(tok_ids))
            if done:
                break
            if stop.requested:
                writing.result()
            stop.check()
        writing.result()
    return {"n_short": counter.short, "composition": composition}


def harvest_activations(model, docs: Iterable[tuple[dict, Source]], out: str, cfg: HarvestConfig, attrs: dict, *,
                        force: bool = False, quiet: bool = False, locked: bool = False) -> dict:
    """Harvest into `out` atomically: a `.partial` file beside it, resumed when the same configuration
    finds one (--force only discards one of another configuration), renamed into place when complete.
    `cfg` is resolved (HarvestConfig.resolve: the hook named, the shard set).  `locked`: the caller holds
    `outputs.exclusive(out)` already.  Returns the artifact record."""
    cfg.check()
    check_target(out, force)
    if locked:
        return _harvest_locked(model, docs, out, cfg, attrs, force=force, quiet=quiet)
    with exclusive(out):
        return _harvest_locked(model, docs, out, cfg, attrs, force=force, quiet=quiet)


def _open_writer(tmp: str, model, cfg: HarvestConfig, attrs: dict, resume: bool) -> ActivationWriter:
    """The partial's writer: resumed, or a new file created only where nothing is (never through a link)."""
    try:
        return ActivationWriter(tmp, d_model=model.hook_width(cfg.hook), dtype=cfg.dtype, attrs=attrs, resume=resume,
                                create="x")
    except Exception as e:
        if is_full_disk(e):
            if not resume and os.path.exists(tmp):
                os.remove(tmp)
            raise no_space(tmp) from None
        raise


def _harvest_locked(model, docs, out, cfg, attrs, *, force, quiet) -> dict:
    tmp = partial_path(out)
    refuse_link(tmp)
    resume = False
    if os.path.exists(tmp):
        try:
            old = ActivationStore(tmp, allow_incomplete=True)
            same = old.attrs.get("config") == attrs["config"]
            old.close()
        except (BadInput, OSError, RuntimeError, KeyError, ValueError) as e:
            # a checkpoint cut off mid-write (SIGKILL, a full disk): nothing to resume
            log.warning("cannot resume %s (%s): starting over", tmp, e)
            same = None
        if same:  # same configuration and inputs: resuming gives what a fresh run would, even under --force
            resume = True
            log.info("resuming %s", tmp)
        else:
            if same is False and not force:
                raise BadInput(f"{tmp}: an interrupted harvest with a different configuration is there "
                               "(use --force to start over)")
            os.remove(tmp)
    try:
        writer = _open_writer(tmp, model, cfg, attrs, resume)
    except OSError as e:
        if not resume or is_full_disk(e):
            raise no_space(tmp) if is_full_disk(e) else e
        log.warning("cannot resume %s (%s): starting over", tmp, e)  # torn before its last checkpoint
        resume = False
        os.remove(tmp)
        writer = _open_writer(tmp, model, cfg, attrs, resume)
    try:
        with StopFlag() as stop:
            summary = harvest_into(model, docs, writer, cfg, stop, quiet=quiet)
    except BadInput:
        writer.close()
        if not resume:
            os.remove(tmp)
        raise
    except BaseException as e:
        writer.close()  # the checkpoint stays for a rerun
        if isinstance(e, Exception) and is_full_disk(e):
            raise no_space(tmp) from None
        raise
    n_tokens, n_docs = writer.n_tokens, writer.n_docs
    if n_tokens == 0:
        writer.close()
        os.remove(tmp)
        raise BadInput("no tokens harvested: the input had no usable documents"
                       + (f" ({summary['n_short']} too short)" if summary["n_short"] else ""))
    if summary["n_short"]:
        log.warning("%d document(s) shorter than %d token(s) were skipped", summary["n_short"], cfg.min_tokens)
    composition = summary["composition"].finish(cfg.max_tokens_per_doc or None)
    writer.reserve(0, len(json.dumps(composition)))
    writer.finish(n_short_docs=summary["n_short"], composition=composition)
    os.replace(tmp, out)
    log.info("wrote %s: %d tokens from %d documents", out, n_tokens, n_docs)
    for line in describe(composition):
        log.info("%s", line)
    return activation_artifact(out)

