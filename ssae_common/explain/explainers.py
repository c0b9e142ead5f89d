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

import base64
import json
import logging
import math
import random
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

from ..core.errors import BadInput, SsaeError
from ..core.stats import roc_auc

log = logging.getLogger("ssae")

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

USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)([^/@]*)@")


def redact_url(url: str | None) -> str | None:
    """`url` without the user:password it may carry (never stored or shown)."""
    return USERINFO.sub(r"\1***@", url) if url else url


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """`text` (e.g. an error body that echoes the request) with Authorization values and `secrets` hidden."""
    text = re.sub(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)(bearer\s+|basic\s+)?[^\s\"',}]+", r"\1\2***", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


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
            raise BadInput(f"{option} {redact_url(url)}: expected an http:// or https:// URL")
        if not model:
            raise BadInput(f"{option.replace('url', 'model')}: required with an openai backend (the served model name)")
        m = USERINFO.match(url)
        userinfo = m.group(2) if m else ""
        # user:password in the URL is sent as Basic authentication (unless an API key is set) and never shown
        self.url, self.model, self.api_key = chat_completions_url(USERINFO.sub(r"\1", url)), model, api_key
        self.basic = base64.b64encode(urllib.parse.unquote(userinfo).encode()).decode() if userinfo else None
        self.secrets = tuple(x for x in (api_key, userinfo, userinfo.partition(":")[2], self.basic) if x)
        self.shown = redact_url(chat_completions_url(url))
        self.timeout, self.max_retries, self.option = timeout, max_retries, option
        self.name = f"openai:{model}"
        self.requests = 0

    def chat(self, messages: list[dict], max_tokens: int = 128, temperature: float = 0.0, seed: int = 0) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": max_tokens,
                           "temperature": temperature, "seed": seed}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        elif self.basic:
            headers["Authorization"] = f"Basic {self.basic}"
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
                detail = redact(e.read()[:300].decode("utf-8", "replace").strip(), self.secrets)
                if e.code in self.retry_status and not last:
                    log.info("%s: HTTP %d, retrying in %.1f s", self.shown, e.code, delay)
                else:
                    raise EndpointError(f"{self.option} {self.shown}: HTTP {e.code} {e.reason}"
                                        + (f": {detail}" if detail else "")) from None
            except (urllib.error.URLError, socket.timeout, ConnectionError, TimeoutError) as e:
                reason = getattr(e, "reason", e)
                if last:
                    raise EndpointError(f"{self.option} {self.shown}: cannot reach the endpoint ({reason})") from None
                log.info("%s: %s, retrying in %.1f s", self.shown, reason, delay)
            time.sleep(delay)
            delay *= 2
        try:
            data = json.loads(payload)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise EndpointError(f"{self.option} {self.shown}: not an OpenAI chat completion response "
                                f"({redact(payload[:200].decode('utf-8', 'replace'), self.secrets)!r})") from None
        return content or ""


class LocalLM:
    """A Hugging Face causal LM in-process, with the chat template when the tokenizer has one."""

    def __init__(self, spec: str, device: str = "cpu", flag: str = "--explainer-model"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..data.models import model_identity, resolve_model_path

        path = resolve_model_path(spec, flag)
        log.info("loading %s %s on %s", flag.removeprefix("--"), spec, device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        except OSError as e:
            raise BadInput(f"{flag} {spec}: cannot load ({str(e).splitlines()[0]})") from None
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
        return LocalLM(model or DEFAULT_MODEL, device, flag=f"{option_prefix}-model")
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
    if isinstance(expl, str):
        # a weak model may run on into the next field ("Diversity: 100"): that is not an explanation
        expl = re.split(r"(?i)\b(?:explanation|diversity(?:\s+score)?|justification)\s*:", expl)[0]
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
    # a ranking needs scores (the local scorer's log-odds); with a single class it is undefined (None)
    return {"score_status": status, **metrics, "auc": roc_auc(scores, truth) if scores is not None else None,
            "predictions": [predicted[back[i]] for i in range(len(held_out))]}
