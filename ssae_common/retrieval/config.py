"""The options of ssae-retrieve, declared once (the tool's flags are generated from these fields).

Only the standard library and ssae_common.core.config are imported here, so `ssae-retrieve --help`
and `from ssae_common.retrieval import RetrieveConfig` stay light.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..core.config import ConfigError, check_bounds, option, replace
from ..data.config import DEFAULT_MAX_TOKENS_PER_DOC, MODEL_DTYPE_HELP, MODEL_DTYPES

METHODS = ("bm25", "dense", "hybrid")
ENGINES = ("bm25s", "rank-bm25")
DENSE_BACKENDS = ("auto", "torch", "torch-bf16", "torch-fp16", "onnx", "onnx-int8")
COMBINERS = ("rrf", "max", "sum")
RERANKERS = ("none", "tracin")
DEFAULT_DENSE_MODEL = "all-MiniLM-L6-v2"
RRF_K = 60
DEFAULT_TOP_K = 1000


@dataclass(frozen=True)
class RetrieveConfig:
    corpus: tuple[str, ...] = option(
        (), multiple=True,
        help="Corpus to retrieve from (.jsonl[.gz], .txt, .parquet, hf:NAME[:SPLIT]); repeatable.")
    text_field: str = option("text", help="Field holding the text (corpus, seeds, --exclude).")
    method: str = option("bm25", choices=METHODS, help="bm25, dense or hybrid (reciprocal-rank fusion of both).")
    engine: str = option("bm25s", choices=ENGINES, help="BM25 engine: bm25s, or rank-bm25 (slow reference).")
    k1: float = option(1.5, min=0, help="BM25 k1.")
    b: float = option(0.75, min=0, max=1, help="BM25 b.")
    stopwords: str = option("en", help="BM25 stopword list: en, en_plus or none.")
    stemmer: str = option("english", help="Snowball stemmer language for BM25, or none.")
    dense_model: str = option(
        DEFAULT_DENSE_MODEL,
        help="sentence-transformers model: the bundled all-MiniLM-L6-v2, a Hugging Face name or a folder.")
    dense_batch_size: int = option(64, min=1, help="Texts per encoder batch.",
                                   hashed=False, why="a batch size: the ranking does not depend on it")
    dense_max_length: int | None = option(
        None, min=1, derived="the model's own, 256 for MiniLM",
        help="Encoder tokens per text (longer texts are cut).")
    dense_backend: str = option(
        "auto", choices=DENSE_BACKENDS,
        help="Encoder runtime: auto (CUDA: torch-fp16; CPU: torch-bf16 on bfloat16 hardware, else onnx when "
             "onnxruntime is installed, else torch), torch (float32), torch-bf16, torch-fp16, onnx or onnx-int8.")
    combine: str = option("rrf", choices=COMBINERS, help="How per-seed rankings combine: rrf, max or sum.")
    rrf_k: int = option(RRF_K, min=1, help="k of reciprocal-rank fusion.")
    depth: int = option(1000, min=1, help="Ranked documents kept per seed (and method).")
    top_k: int | None = option(None, min=1, derived=f"{DEFAULT_TOP_K} unless --budget-tokens",
                               help="Documents to output.")
    budget_tokens: int | None = option(
        None, min=1, help="Output documents until this many tokens (of --model's tokenizer, each document "
                          "counted up to --max-tokens-per-doc, as ssae-harvest stores them).")
    max_tokens_per_doc: int = option(
        DEFAULT_MAX_TOKENS_PER_DOC, min=0,
        help="--budget-tokens counts at most this many tokens of a document (ssae-harvest's cap; 0: none).")
    exclude: tuple[str, ...] = option(
        (), multiple=True,
        help="File of documents never to output (by id or normalised text); repeatable.")
    include_seeds: bool = option(False, help="Allow the seed documents themselves in the output.")
    rerank: str = option("none", choices=RERANKERS, help="none, or tracin (needs --sae).")
    sae: tuple[str, ...] = option(
        (), multiple=True, help="SAE folder (ssae.sae/1) for TracIn; repeat for several checkpoints.")
    model: str | None = option(None, derived="the SAE's, else smollm2",
                               help="Language model for TracIn and --budget-tokens.")
    hook: str | None = option(None, derived="the SAE's", help="Hook for TracIn activations.")
    model_dtype: str = option("auto", help="TracIn: " + MODEL_DTYPE_HELP, choices=MODEL_DTYPES)
    rerank_pool: float = option(
        3.0, min=1,
        help="TracIn reranks this many times the output size (documents or budget) of first-stage results.")
    tracin_normalize: bool = option(
        False, negative="tracin-raw",
        help="Divide each candidate's TracIn score by its gradient norm (cosine up to a constant).")
    context_size: int = option(128, min=2, help="Tokens per document for TracIn (BOS included).")
    batch_size: int = option(8, min=1, help="Documents per LM forward pass (TracIn).",
                             hashed=False, why="a batch size: the ranking does not depend on it")

    def check(self) -> None:
        check_bounds(self)
        if not self.corpus:
            raise ConfigError("corpus", "", "no corpus given (a file or hf:NAME; or set SSAE_CORPUS)")
        if "-" in self.corpus:
            raise ConfigError("corpus", "-", "the corpus must be a file or hf:NAME (stdin carries the seeds)")
        if self.rerank == "tracin" and not self.sae:
            raise ConfigError("sae", "", "--rerank tracin needs one or more SAE checkpoint folders")
        if self.sae and self.rerank != "tracin":
            raise ConfigError("sae", self.sae, "only used with --rerank tracin")

    def resolve(self) -> RetrieveConfig:
        """Checked, with the output size filled in: DEFAULT_TOP_K documents unless a token budget is set.
        (model and hook default to the SAE's, which the stage reads from the checkpoints.)"""
        self.check()
        if self.top_k is None and self.budget_tokens is None:
            return replace(self, top_k=DEFAULT_TOP_K)
        return self
