"""Natural-language explanations of SAE latents and their detection scores.

Backends (one chat interface):
  * OpenAIChat: any OpenAI-compatible `/v1/chat/completions` endpoint (OpenAI, vLLM, llama.cpp's
    server, ...), over urllib; no extra dependency.
  * LocalLM: a Hugging Face causal LM run in-process (default the bundled SmolLM2-135M-Instruct).  It
    fills the reply field by field (assistant prefill), the diversity score by digit-constrained decoding,
    and scores detection from the next-token odds of "Yes" against "No".

Explanation prompt: the top-activating windows, activating tokens marked <<like this>>; the reply gives
a unified explanation, a diversity score 0-100 and its justification.  Replies are parsed leniently
(labels, markdown, JSON); a reply that still does not parse is retried with sampling, then recorded as
malformed with the raw text.

Detection: the scorer sees the explanation and held-out windows (activating at quantiles of the
activation distribution, and non-activating random windows, shuffled, unmarked) and says which
activate; precision, recall and F1 follow.
"""
from __future__ import annotations

import json
import logging
import math
import random
import re
import socket
import time
import urllib.error
import urllib.request

from ..core.errors import BadInput, SsaeError

log = logging.getLogger("ssae")

SCHEMA = "ssae.explanation/1"
EXPLAIN_SYSTEM = (
    "You are an interpretability researcher. You study one latent (feature) of a sparse autoencoder "
    "trained on a language model's activations. You are shown text excerpts where the latent is active; "
    "the tokens where it is most active are marked <<like this>>.")
EXPLAIN_FORMAT = (
    "Answer in three lines. On the first line, after 'Explanation:', say in a few words what the marked "
    "tokens have in common. On the second line, after 'Diversity:', give an integer from 0 (all contexts "
    "show one narrow pattern) to 100 (the contexts are unrelated). On the third line, after "
    "'Justification:', say in one sentence why you chose that diversity.")
_INSTRUCTION_WORDS = set(re.findall(r"[a-z]+", EXPLAIN_FORMAT.lower()))
SCORE_SYSTEM = "You decide whether a feature of a language model is present in a text."


class EndpointError(SsaeError):
    """The chat endpoint is unreachable or answers with an error: a runtime failure (exit 1)."""


# ----------------------------------------------------------------------------------------- backends

def chat_completions_url(url: str) -> str:
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if re.search(r"/v\d+$", url):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


class OpenAIChat:
    """An OpenAI-compatible chat endpoint."""

    retry_status = (408, 409, 429, 500, 502, 503, 504)
    backoff = 0.5  # seconds before the first retry; doubles after each

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 3, option: str = "--explainer-url"):
        if not url:
            raise BadInput(f"{option}: required for an openai backend")
        if not re.match(r"^https?://", url):
            raise BadInput(f"{option} {url}: expected an http:// or https:// URL")
        if not model:
            raise BadInput(f"{option.replace('url', 'model')}: required with an openai backend (the served model name)")
        self.url, self.model, self.api_key = chat_completions_url(url), model, api_key
        self.timeout, self.max_retries, self.option = timeout, max_retries, option
        self.name = f"openai:{model}"
        self.requests = 0

    def chat(self, messages: list[dict], max_tokens: int = 128, temperature: float = 0.0, seed: int = 0) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": max_tokens,
                           "temperature": temperature, "seed": seed}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        delay = self.backoff
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                self.requests += 1
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = response.read()
                break
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace").strip()
                if e.code in self.retry_status and not last:
                    log.info("%s: HTTP %d, retrying in %.1f s", self.url, e.code, delay)
                else:
                    raise EndpointError(f"{self.option} {self.url}: HTTP {e.code} {e.reason}"
                                        + (f": {detail}" if detail else "")) from None
            except (urllib.error.URLError, socket.timeout, ConnectionError, TimeoutError) as e:
                reason = getattr(e, "reason", e)
                if last:
                    raise EndpointError(f"{self.option} {self.url}: cannot reach the endpoint ({reason})") from None
                log.info("%s: %s, retrying in %.1f s", self.url, reason, delay)
            time.sleep(delay)
            delay *= 2
        try:
            data = json.loads(payload)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise EndpointError(f"{self.option} {self.url}: not an OpenAI chat completion response "
                                f"({payload[:200].decode('utf-8', 'replace')!r})") from None
        return content or ""


class LocalLM:
    """A Hugging Face causal LM in-process, with the chat template when the tokenizer has one."""

    def __init__(self, spec: str, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..data.models import model_identity, resolve_model_path

        path = resolve_model_path(spec)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        except OSError as e:
            raise BadInput(f"--explainer-model {spec}: cannot load ({str(e).splitlines()[0]})") from None
        self.device = device
        self.name = f"local:{model_identity(spec)}"
        self._text: dict[int, str] = {}
        self._digits = None
        self._yes_no = None
        import inspect

        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x

    # -- prompts
    def prompt_ids(self, messages: list[dict], prefill: str = "") -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"
            prefill = (" " + prefill) if prefill else prefill
        return tok(text + prefill, add_special_tokens=False)["input_ids"]

    def token_text(self, token_id: int) -> str:
        s = self._text.get(token_id)
        if s is None:
            s = self._text[token_id] = self.tokenizer.decode([token_id])
        return s

    def _digit_ids(self):
        if self._digits is None:
            import torch

            n = len(self.tokenizer)
            texts = self.tokenizer.batch_decode([[i] for i in range(n)])
            digit = [t.strip().isdigit() and len(t.strip()) <= 3 and t.strip() == t.lstrip() for t in texts]
            self._digits = torch.tensor(digit, dtype=torch.bool)
        return self._digits

    def generate(self, ids: list[int], max_tokens: int, temperature: float = 0.0, seed: int = 0,
                 stop_newline: bool = True, digits: bool = False) -> str:
        """Greedy (temperature 0) or seeded sampling, stopping at a newline or EOS.  With `digits`, only
        digit tokens may be produced (at least one, then stopping at the first non-digit choice)."""
        import torch

        gen = torch.Generator().manual_seed(int(seed))
        eos = self.tokenizer.eos_token_id
        out: list[int] = []
        past = None
        x = torch.tensor([ids], device=self.device)
        with torch.inference_mode():
            for step in range(max_tokens):
                o = self.model(input_ids=x, use_cache=True, **{self._cache_arg: past})
                past = getattr(o, self._cache_arg, None)
                logits = o.logits[0, -1].float().cpu()
                if digits:
                    mask = self._digit_ids()[:logits.shape[0]]
                    if step > 0:
                        best_digit = logits.masked_fill(~mask, -math.inf).max()
                        if logits.max() > best_digit:  # the model would rather stop here
                            break
                    logits = logits.masked_fill(~mask, -math.inf)
                if temperature > 0:
                    probs = torch.softmax(logits / temperature, -1)
                    token = int(torch.multinomial(probs, 1, generator=gen))
                else:
                    token = int(logits.argmax())
                if token == eos:
                    break
                text = self.token_text(token)
                if stop_newline and "\n" in text:
                    head = text.split("\n", 1)[0]
                    if head:
                        out.append(token)
                    break
                out.append(token)
                x = torch.tensor([[token]], device=self.device)
        return self.tokenizer.decode(out).split("\n", 1)[0]

    def chat(self, messages: list[dict], max_tokens: int = 128, temperature: float = 0.0, seed: int = 0) -> str:
        return self.generate(self.prompt_ids(messages), max_tokens, temperature, seed, stop_newline=False)

    def fill_fields(self, messages: list[dict], max_tokens: int, temperature: float, seed: int) -> str:
        """The explanation reply, field by field: the model continues each labelled line."""
        reply = "Explanation:"
        reply += self.generate(self.prompt_ids(messages, reply), max_tokens, temperature, seed)
        reply += "\nDiversity:"
        reply += " " + self.generate(self.prompt_ids(messages, reply + " "), 3, temperature, seed, digits=True).strip()
        reply += "\nJustification:"
        reply += self.generate(self.prompt_ids(messages, reply), max_tokens, temperature, seed)
        return reply

    def yes_logodds(self, messages: list[dict]) -> float:
        """log P(yes) - log P(no) for the first token of the reply (case and leading space variants summed)."""
        import torch

        if self._yes_no is None:
            unk = self.tokenizer.unk_token_id

            def ids_for(*variants):
                for words in variants:  # whole words, else the initial letter
                    found = set()
                    for w in words:
                        t = self.tokenizer(w, add_special_tokens=False)["input_ids"]
                        if len(t) == 1 and t[0] != unk:
                            found.add(t[0])
                    if found:
                        return sorted(found)
                return []

            self._yes_no = (ids_for(["Yes", " Yes", "yes", " yes", "YES"], ["Y", " Y", "y", " y"]),
                            ids_for(["No", " No", "no", " no", "NO"], ["N", " N", "n", " n"]))
        yes, no = self._yes_no
        if not yes or not no:
            raise BadInput(f"{self.name}: its tokenizer has no single token for Yes/No; give --scorer-model")
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([self.prompt_ids(messages)], device=self.device)).logits[0, -1]
            logp = torch.log_softmax(logits.float(), -1).cpu()
        return float(torch.logsumexp(logp[yes], 0) - torch.logsumexp(logp[no], 0))


def make_backend(kind: str, *, model: str | None, url: str | None, api_key: str | None, device: str,
                 timeout: float, option_prefix: str = "--explainer"):
    from ..data.config import DEFAULT_MODEL

    if kind == "local":
        return LocalLM(model or DEFAULT_MODEL, device)
    if kind == "openai":
        return OpenAIChat(url, model, api_key, timeout, option=f"{option_prefix}-url")
    raise BadInput(f"{option_prefix} {kind}: expected local, openai or none")


# ---------------------------------------------------------------------------------- prompt and parse

def window_text(ctx: dict, mark: bool) -> str:
    tokens, acts = ctx["tokens"], ctx["acts"]
    peak = max(acts) if acts else 0.0
    parts = []
    for t, a in zip(tokens, acts):
        if mark and peak > 0 and a >= 0.5 * peak and t.strip():
            lead = t[:len(t) - len(t.lstrip())]
            parts.append(f"{lead}<<{t.strip()}>>")
        else:
            parts.append(t)
    return re.sub(r"\s+", " ", "".join(parts)).strip()


def explain_messages(contexts: list[dict]) -> list[dict]:
    lines = [f"{i + 1}. {window_text(c, mark=True)}" for i, c in enumerate(contexts)]
    user = "Excerpts where the latent is active:\n" + "\n".join(lines) + "\n\n" + EXPLAIN_FORMAT
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": user}]


_LABEL = r"^[\s>*_#-]*(?:\d+[.)]\s*)?{}\s*(?:\([^)]*\))?\s*[*_]*\s*[:=\-]\s*[*_]*\s*(.*)$"


def _label(reply: str, name: str) -> str | None:
    m = re.search(_LABEL.format(name), reply, re.IGNORECASE | re.MULTILINE)
    if not m:
        return None
    value = m.group(1).strip().strip("*_\"'` ").strip()
    return value or None


def _echoes_instructions(text: str) -> bool:
    """A weak model may repeat the format instructions instead of answering."""
    words = re.findall(r"[a-z]+", text.lower())
    return (len(words) >= 4 and sum(w in _INSTRUCTION_WORDS for w in words) / len(words) > 0.8) or text.startswith("<")


def parse_explanation(reply: str) -> dict:
    """-> {'explanation', 'diversity', 'justification'}; missing or invalid parts are None."""
    out = {"explanation": None, "diversity": None, "justification": None}
    m = re.search(r"\{.*\}", reply, re.DOTALL)
    if m:
        try:
            obj = json.loads(m.group(0))
            lower = {str(k).lower(): v for k, v in obj.items()} if isinstance(obj, dict) else {}
            out["explanation"] = lower.get("explanation") or lower.get("unified_explanation")
            out["diversity"] = lower.get("diversity", lower.get("diversity_score"))
            out["justification"] = lower.get("justification") or lower.get("diversity_justification")
        except ValueError:
            pass
    if not out["explanation"]:
        out["explanation"] = _label(reply, r"(?:unified\s+)?explanation")
    if out["diversity"] is None:
        value = _label(reply, r"diversity(?:\s+score)?")
        if value is not None:
            n = re.match(r"(\d{1,3})(?:\s*(?:/|out of)\s*100)?", value)
            out["diversity"] = n.group(1) if n else None
    if not out["justification"]:
        out["justification"] = _label(reply, r"justification")
    try:
        d = out["diversity"]
        d = int(d) if d is not None and float(d) == int(float(d)) else None
        out["diversity"] = d if d is not None and 0 <= d <= 100 else None
    except (TypeError, ValueError):
        out["diversity"] = None
    expl = out["explanation"]
    if not isinstance(expl, str) or len(re.findall(r"[A-Za-z]", expl)) < 2 or _echoes_instructions(expl):
        out["explanation"] = None
    else:
        out["explanation"] = expl.strip()
    if not isinstance(out["justification"], str):
        out["justification"] = None
    return out


def explain_latent(backend, contexts: list[dict], *, retries: int, max_tokens: int, temperature: float,
                   seed: int) -> dict:
    """Ask `backend` to explain; retry malformed replies with sampling. Returns the parsed fields plus
    'status' ('ok' or 'malformed'), 'attempts' and 'raw' (the last reply)."""
    messages = explain_messages(contexts)
    reply = ""
    for attempt in range(retries + 1):
        temp = temperature if attempt == 0 else max(temperature, 0.7)
        s = seed + 7919 * attempt
        if isinstance(backend, LocalLM):
            reply = backend.fill_fields(messages, max_tokens, temp, s)
        else:
            reply = backend.chat(messages, max_tokens=max_tokens * 3, temperature=temp, seed=s)
        parsed = parse_explanation(reply)
        if parsed["explanation"] and parsed["diversity"] is not None:
            return {**parsed, "status": "ok", "attempts": attempt + 1, "raw": reply}
        log.debug("malformed reply (attempt %d): %r", attempt + 1, reply)
    return {**parse_explanation(reply), "status": "malformed", "attempts": retries + 1, "raw": reply}


# ----------------------------------------------------------------------------------------- scoring

def detection_metrics(truth: list[bool], predicted: list[bool]) -> dict:
    """Precision, recall, F1 and accuracy of `predicted` against `truth`.  Precision is 0 when nothing is
    predicted active; recall (and F1) is None when nothing is truly active."""
    if len(truth) != len(predicted):
        raise ValueError("truth and predicted differ in length")
    tp = sum(1 for t, p in zip(truth, predicted) if t and p)
    fp = sum(1 for t, p in zip(truth, predicted) if not t and p)
    fn = sum(1 for t, p in zip(truth, predicted) if t and not p)
    tn = len(truth) - tp - fp - fn
    if tp + fn == 0:
        return {"precision": None, "recall": None, "f1": None, "accuracy": (tn / len(truth)) if truth else None,
                "tp": tp, "fp": fp, "fn": fn, "tn": tn}
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": (tp + tn) / len(truth),
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def auc(truth: list[bool], scores: list[float]) -> float | None:
    """Area under the ROC curve (ties count half); None without both classes."""
    pos = [s for t, s in zip(truth, scores) if t]
    neg = [s for t, s in zip(truth, scores) if not t]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def score_messages(explanation: str, texts: list[str]) -> list[dict]:
    listing = "\n".join(f"{i + 1}. {t}" for i, t in enumerate(texts))
    user = (f"Feature explanation: {explanation}\n\nTexts:\n{listing}\n\n"
            "In which of these texts is the feature present? Reply with a JSON list of the text numbers "
            "only, e.g. [2, 5]; reply [] if none.")
    return [{"role": "system", "content": SCORE_SYSTEM}, {"role": "user", "content": user}]


def parse_selection(reply: str, n: int) -> list[bool] | None:
    """A JSON-ish list of 1-based text numbers -> a mask of length n; None when there is none."""
    found = re.findall(r"\[([^\[\]]*)\]", reply)
    if not found:
        return None
    body = found[-1].strip()
    if body and not re.fullmatch(r"[\d\s,\"']*", body):
        return None
    numbers = [int(x) for x in re.findall(r"\d+", body)]
    if any(not 1 <= k <= n for k in numbers):
        return None
    chosen = set(numbers)
    return [i + 1 in chosen for i in range(n)]


def score_latent(scorer, explanation: str, held_out: list[dict], *, retries: int, seed: int) -> dict:
    """Detection on the held-out windows: the metrics, the predictions and 'score_status'."""
    order = list(range(len(held_out)))
    random.Random(seed).shuffle(order)
    windows = [held_out[i] for i in order]
    truth = [bool(w.get("active")) for w in windows]
    texts = [window_text(w, mark=False) for w in windows]
    scores = None
    if isinstance(scorer, LocalLM):
        scores = []
        for t in texts:
            user = (f"Feature explanation: {explanation}\n\nText: {t}\n\n"
                    "Is the feature present anywhere in this text? Answer Yes or No.")
            scores.append(scorer.yes_logodds([{"role": "system", "content": SCORE_SYSTEM},
                                              {"role": "user", "content": user}]))
        predicted = [s > 0 for s in scores]
        status, raw = "ok", None
    else:
        predicted, raw = None, ""
        for attempt in range(retries + 1):
            raw = scorer.chat(score_messages(explanation, texts), max_tokens=64 + 4 * len(texts),
                              temperature=0.0 if attempt == 0 else 0.7, seed=seed + 7919 * attempt)
            predicted = parse_selection(raw, len(texts))
            if predicted is not None:
                break
        status = "ok" if predicted is not None else "malformed"
    if predicted is None:
        return {"score_status": status, "precision": None, "recall": None, "f1": None, "accuracy": None,
                "auc": None, "score_raw": raw}
    metrics = detection_metrics(truth, predicted)
    back = [0] * len(order)
    for pos, i in enumerate(order):
        back[i] = pos
    out = {"score_status": status, **metrics,
           "auc": auc(truth, scores) if scores is not None else None,
           "predictions": [predicted[back[i]] for i in range(len(held_out))]}
    return out


# ------------------------------------------------------------------------------------------ pipeline

STATISTICS_NOTE = "token statistics only: not an LM explanation"


def _round(x, digits=4):
    return None if x is None else round(float(x), digits)


def latent_record(ctx: dict, *, explainer: str, scorer: str | None, result: dict | None, score: dict | None,
                  config_hash: str) -> dict:
    """One `ssae.explanation/1` record."""
    rec = {"schema": SCHEMA, "latent": ctx["latent"], "status": None, "explanation": None, "diversity": None,
           "diversity_justification": None, "f1": None, "precision": None, "recall": None, "accuracy": None,
           "auc": None, "n_contexts": len(ctx["explain"]) + len(ctx["score"]), "n_explain": len(ctx["explain"]),
           "n_scored": len(ctx["score"]), "top_tokens": ctx["top_tokens"], "density": ctx["density"],
           "n_active": ctx["n_active"], "max_activation": ctx["max_activation"], "explainer": explainer,
           "scorer": scorer, "config_hash": config_hash}
    if ctx["n_active"] == 0:
        rec["status"] = "dead"
        rec["note"] = "the latent never activates on this store"
        return rec
    if result is None:
        rec["status"] = "statistics"
        rec["note"] = STATISTICS_NOTE
        return rec
    rec["status"] = result["status"]
    rec["explanation"] = result["explanation"]
    rec["diversity"] = result["diversity"]
    rec["diversity_justification"] = result["justification"]
    rec["attempts"] = result["attempts"]
    if result["status"] != "ok":
        rec["raw_reply"] = result["raw"]
    if score is not None:
        for key in ("precision", "recall", "f1", "accuracy", "auc"):
            rec[key] = _round(score.get(key))
        rec["score_status"] = score["score_status"]
        if "predictions" in score:
            rec["predictions"] = score["predictions"]
        if score.get("score_raw") is not None and score["score_status"] != "ok":
            rec["score_raw"] = score["score_raw"]
    return rec


def read_done(path: str) -> list[dict]:
    """Records of an interrupted run; a torn last line (killed mid-write) is dropped and the file trimmed."""
    import os

    if not os.path.exists(path):
        return []
    good, size = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
                if not line.endswith(b"\n"):
                    raise ValueError
            except ValueError:
                break
            good.append(rec)
            size += len(line)
    if size != os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(size)
    return good


def append_records(path: str, records: list[dict]) -> None:
    import os

    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _contexts_io(path: str, contexts: list[dict] | None = None) -> list[dict]:
    """Write (atomically) or read the extracted contexts of a run, one latent a line, gzipped."""
    import gzip
    import os

    if contexts is not None:
        tmp = path + ".tmp"
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=3) as f:
            for c in contexts:
                f.write(json.dumps(c, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        return contexts
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def run_explain(job, common) -> dict:
    """The whole of ssae-explain (see tools/explain.py): contexts, explanations, scores, browser.

    Work goes into a `.OUT.partial` folder beside OUT: run.json (configuration), contexts.jsonl.gz,
    explanations.jsonl appended after every batch of latents.  A rerun of the same configuration resumes
    there; at the end the browser page is written and the folder renamed to OUT."""
    import os
    import shutil

    from ..data.activations import ActivationStore
    from .browser import write_browser
    from ..core.outputs import default_output
    from .contexts import extract_contexts, parse_latents
    from ..core.outputs import check_target, commit, partial_path, sha256_file
    from ..core.progress import Progress
    from ..core.provenance import config_hash, created_by, input_fingerprint
    from ..sae.autoencoder import SAE
    from ..core.signals import StopFlag

    sae = SAE.load(job.sae_path, "cpu")
    store = ActivationStore(job.store_path)
    try:
        if not store.has_text:
            raise BadInput(f"{job.store_path}: no document text stored (harvested with --no-store-text); "
                           "ssae-explain needs it for contexts")
        if sae.d_in != store.d_model:
            raise BadInput(f"{job.store_path}: activations have width {store.d_model}, the SAE {job.sae_path} expects "
                           f"d_in {sae.d_in}")
        for attr in ("model", "hook"):
            if sae.cfg.get(attr) and getattr(store, attr) and sae.cfg[attr] != getattr(store, attr):
                log.warning("the SAE was trained on %s %s, the activations come from %s", attr, sae.cfg[attr],
                            getattr(store, attr))
        latents = parse_latents(job.latents, sae.d_sae)
        job.ctx.seed = common.seed
        if job.explainer not in ("local", "openai", "none"):
            raise BadInput(f"--explainer {job.explainer}: expected local, openai or none")
        scoring = job.score and job.explainer != "none"
        resolved = common.resolved(
            sae={"path": os.path.abspath(job.sae_path), "sha256": sha256_file(job.sae_path)},
            activations={"path": os.path.abspath(job.store_path), "sha256": input_fingerprint(job.store_path)},
            latents=job.latents or "all", n_latents=len(latents), explainer=job.explainer,
            explainer_model=job.explainer_model, explainer_url=job.explainer_url,
            scorer_url=job.scorer_url if scoring else None, scorer_model=job.scorer_model if scoring else None,
            score=scoring, tokenizer=job.tokenizer_model or store.model, retries=job.retries,
            max_new_tokens=job.max_tokens, temperature=job.temperature,
            contexts={k: v for k, v in vars(job.ctx).items() if k not in ("chunk_rows", "seed")})
        digest = config_hash(resolved)
        out = job.out
        if out is None:
            out = default_output("explanations", digest, "")
            if os.path.exists(os.path.join(out, "explanations.jsonl")) and not common.force:
                log.info("reusing %s", out)
                return _artifact(out)
        check_target(out, common.force)
        work = partial_path(out)
        run_file = os.path.join(work, "run.json")
        if os.path.isdir(work):
            try:
                with open(run_file) as f:
                    same = json.load(f).get("config_hash") == digest
            except (OSError, ValueError):
                same = False
            if same:
                log.info("resuming %s", work)
            elif common.force:
                shutil.rmtree(work)
            else:
                raise BadInput(f"{work}: an interrupted ssae-explain with a different configuration is there "
                               "(use --force to start over)")
        if not os.path.isdir(work):
            os.makedirs(work)
            with open(run_file + ".tmp", "w") as f:
                json.dump({"schema": "ssae.explain-run/1", "config_hash": digest, "config": resolved,
                           "created_by": created_by("ssae-explain"), "seed": common.seed}, f, indent=2)
            os.replace(run_file + ".tmp", run_file)

        contexts_file = os.path.join(work, "contexts.jsonl.gz")
        with StopFlag() as stop:
            if os.path.exists(contexts_file):
                contexts = _contexts_io(contexts_file)
            else:
                tokenizer = load_tokenizer(job.tokenizer_model or store.model)
                log.info("extracting contexts of %d latent(s) from %s (%d tokens)", len(latents), job.store_path,
                         store.n_tokens)
                with Progress("contexts", total=store.n_tokens, unit="tokens", quiet=common.quiet) as progress:
                    contexts = extract_contexts(store, sae, latents, job.ctx, tokenizer, device=common.device,
                                                stop=stop, progress=progress)
                _contexts_io(contexts_file, contexts)
            store.close()

            records_file = os.path.join(work, "explanations.jsonl")
            done = {r["latent"]: r for r in read_done(records_file)}
            todo = [c for c in contexts if c["latent"] not in done]
            if done:
                log.info("%d latent(s) already explained, %d to go", len(done), len(todo))
            explainer = scorer = None
            if job.explainer != "none" and any(c["n_active"] for c in todo):
                explainer, scorer = _backends(job, common, scoring)
            explainer_name = explainer.name if explainer else "none"
            scorer_name = scorer.name if scorer else None
            with Progress("explain", total=len(todo), unit="latents", quiet=common.quiet) as progress:
                for s in range(0, len(todo), job.batch_latents):
                    batch = []
                    try:
                        for ctx in todo[s:s + job.batch_latents]:
                            batch.append(_explain_one(ctx, job, explainer, scorer, explainer_name, scorer_name,
                                                      digest, common.seed))
                            progress.update(1)
                    except EndpointError as e:
                        append_records(records_file, batch)
                        kept = len(done) + len(batch)
                        raise EndpointError(f"{e}; {kept} explanation(s) so far kept in {work}, rerun the same "
                                            "command to continue") from None
                    append_records(records_file, batch)
                    done.update((r["latent"], r) for r in batch)
                    stop.check()

        records = [done[c["latent"]] for c in contexts]
        with open(records_file + ".tmp", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(records_file + ".tmp", records_file)
        with open(run_file) as f:
            run_info = json.load(f)
        write_browser(os.path.join(work, "index.html"), contexts, records, run_info)
        commit(work, out)
        log.info("wrote %s: %d explanation record(s) and index.html", out, len(records))
        return _artifact(out)
    finally:
        store.close()


def _artifact(out: str) -> dict:
    import os

    from ..core.records import artifact_record

    records = read_done(os.path.join(out, "explanations.jsonl"))
    ok = [r for r in records if r.get("status") == "ok"]
    f1 = [r["f1"] for r in ok if r.get("f1") is not None]
    return artifact_record("explanations", out, explanations=os.path.join(os.path.abspath(out), "explanations.jsonl"),
                           browser=os.path.join(os.path.abspath(out), "index.html"), n_latents=len(records),
                           n_explained=len(ok), mean_f1=round(sum(f1) / len(f1), 4) if f1 else None)


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    from ..data.models import resolve_model_path

    if not spec:
        raise BadInput("the activation file names no model: give --model for its tokenizer")
    path = resolve_model_path(spec)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise BadInput(f"--model {spec}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None


def _backends(job, common, scoring: bool):
    import os

    key = os.environ.get(job.api_key_env) if job.api_key_env else None
    if job.explainer == "openai" and not key:
        log.info("%s is not set: calling %s without an API key", job.api_key_env, job.explainer_url)
    explainer = make_backend(job.explainer, model=job.explainer_model, url=job.explainer_url, api_key=key,
                             device=common.device, timeout=job.timeout)
    if not scoring:
        return explainer, None
    if job.scorer_url:
        scorer = make_backend("openai", model=job.scorer_model or job.explainer_model, url=job.scorer_url,
                              api_key=key, device=common.device, timeout=job.timeout, option_prefix="--scorer")
    elif job.scorer_model:
        scorer = make_backend("local", model=job.scorer_model, url=None, api_key=None, device=common.device,
                              timeout=job.timeout, option_prefix="--scorer")
    else:
        scorer = explainer
    return explainer, scorer


def _explain_one(ctx, job, explainer, scorer, explainer_name, scorer_name, digest, seed) -> dict:
    if explainer is None or ctx["n_active"] == 0:
        return latent_record(ctx, explainer=explainer_name, scorer=None, result=None, score=None, config_hash=digest)
    latent_seed = seed * 1_000_003 + ctx["latent"]
    result = explain_latent(explainer, ctx["explain"], retries=job.retries, max_tokens=job.max_tokens,
                            temperature=job.temperature, seed=latent_seed)
    score = None
    if scorer is not None:
        if result["status"] != "ok":
            score = {"score_status": "no_explanation"}
        elif not any(w.get("active") for w in ctx["score"]):
            score = {"score_status": "no_held_out_activations"}
        else:
            score = score_latent(scorer, result["explanation"], ctx["score"], retries=job.retries, seed=latent_seed)
    return latent_record(ctx, explainer=explainer_name, scorer=scorer_name if score else None, result=result,
                         score=score, config_hash=digest)
