"""Builders for test data: a tiny randomly initialised Llama with a word-level tokenizer, documents,
activation stores.  No hub access is needed."""
from __future__ import annotations

import json
import os
import re

WORDS = ("the a of and to in is was for on that with as by at from it an be this are were "
         "star galaxy planet orbit mass light energy field quantum particle wave spin "
         "nurse doctor surgeon physician hospital patient care she he her his him "
         "cat dog house tree river city music film game team market price bank").split()


def make_tokenizer(folder: str, bos: str | None = "<s>", eos: str = "</s>", pad: str | None = None):
    """A word-level tokenizer over WORDS saved into `folder`, with a family's special tokens: `bos` None
    for a tokenizer without one (Qwen's), `pad` None pads with EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0}
    for special in (bos, eos, pad):
        if special is not None:
            vocab.setdefault(special, len(vocab))
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,!?;:'\"()-":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token="<unk>",
                                   pad_token=pad or eos)
    fast.save_pretrained(folder)
    return fast


def make_tiny_model(folder: str, n_layers: int = 2, d_model: int = 16, seed: int = 0) -> str:
    """A tiny random Llama saved as a local model folder (what `--model FOLDER` takes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    os.makedirs(folder, exist_ok=True)
    tok = make_tokenizer(folder)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=d_model, intermediate_size=2 * d_model,
                         num_hidden_layers=n_layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


# Tiny configurations of the model families a researcher brings, each with its family's special tokens:
# (config class, model class, special tokens, config fields). Every one has 3 layers, d_model 32, 4 heads
# of 8 (Gemma 2: of 16, so that attn.hook_z is wider than d_model); the sliding windows (Gemma 2/3,
# Mistral) are shorter than a test window so that they matter.
FAMILIES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(bos="<|endoftext|>", eos="<|endoftext|>"),
             dict(n_embd=32, n_layer=3, n_head=4, n_positions=256)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(bos="<|endoftext|>", eos="<|endoftext|>"),
                 dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                      max_position_embeddings=256, use_parallel_residual=True, rotary_pct=0.25,
                      tie_word_embeddings=False)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(bos="<bos>", eos="<eos>", pad="<pad>"),
               dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=4,
                    final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=8)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(bos="<bos>", eos="<eos>", pad="<pad>"),
               dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=4,
                    sliding_window_pattern=2, query_pre_attn_scalar=8)),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(bos="<|begin_of_text|>", eos="<|end_of_text|>"),
               dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256, rope_theta=500000.0,
                    tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(bos=None, eos="<|endoftext|>"),
              dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(bos=None, eos="<|endoftext|>"),
              dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(bos="<s>", eos="</s>"),
                dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=4,
                     tie_word_embeddings=False)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(bos="<s>", eos="<|endoftext|>"),
             dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=256, original_max_position_embeddings=256,
                  sliding_window=None, tie_word_embeddings=False)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(bos=None, eos="<|endoftext|>", pad="<|pad|>"),
              dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False)),
}


def make_family_model(folder: str, family: str, seed: int = 0) -> str:
    """A tiny random model of `family` (a FAMILIES key) saved as a local model folder."""
    import torch
    import transformers

    config_class, model_class, specials, fields = FAMILIES[family]
    os.makedirs(folder, exist_ok=True)
    tok = make_tokenizer(folder, **specials)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    config = getattr(transformers, config_class)(vocab_size=len(tok), **ids, **fields)
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config)
    with torch.no_grad():  # random weights at a scale that keeps every layer's output informative
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def write_jsonl(path: str, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def sample_docs(n: int = 20, words: int = 30, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    return [{"id": f"d{i}", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 2, words)))}
            for i in range(n)]


def parse_records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def tokens_of(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text)


def make_store(path, acts, dtype="float32", complete=True, model="synthetic-lm", hook="blocks.0.hook_resid_post",
               token_ids=None):
    import numpy as np

    from ssae_common.data.activations import ActivationWriter

    n, d = acts.shape
    w = ActivationWriter(path, d_model=d, dtype=dtype, attrs={"model": model, "hook": hook, "config": {"rows": n}},
                         resume=False)
    w.add_docs(["d0"], ["text"], [0])
    tok = np.zeros(n, np.int32) if token_ids is None else np.asarray(token_ids, np.int32)
    w.add_rows(np.asarray(acts, dtype=np.float32), tok, np.zeros(n, np.int32), np.arange(n, dtype=np.int32))
    w.checkpoint(1, 1, 0)
    if complete:
        w.finish()
    else:
        w.close()
    return str(path)


def sparse_data(n=6000, d=16, n_dirs=24, seed=0):
    """Rows that are sparse sums of random unit directions plus an offset (SAE-recoverable)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((n_dirs, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    codes = (rng.random((n, n_dirs)) < 0.08) * (1 + rng.exponential(1.0, (n, n_dirs)))
    return (codes @ dirs + 3.0 + 0.05 * rng.standard_normal((n, d))).astype(np.float32)


BIO_FILLER = "the a of and to in is was for on that with as by at from hospital patient care city team".split()
PRONOUNS = {"female": ["she", "her"], "male": ["he", "his", "him"]}


def synthetic_bios(per_cell: int = 40, seed: int = 0) -> list[dict]:
    """Each bio: one profession word, four gendered pronouns, twelve fillers, shuffled. Nurses are
    half the documents, physicians and surgeons a quarter each, both genders equally."""
    import random

    rng = random.Random(seed)
    records = []
    for profession, n in (("nurse", 2 * per_cell), ("physician", per_cell), ("surgeon", per_cell)):
        for gender in ("female", "male"):
            for i in range(n):
                words = ([rng.choice(BIO_FILLER) for _ in range(12)] + [profession]
                         + [rng.choice(PRONOUNS[gender]) for _ in range(4)])
                rng.shuffle(words)
                records.append({"id": f"{profession}-{gender}-{i}", "text": " ".join(words),
                                "profession": profession, "gender": gender})
    return records


def invoke(command, args, input=None, code=None, catch_exceptions=False):
    """Run a click command in-process (CliRunner); with `code`, assert the exit status."""
    from click.testing import CliRunner

    result = CliRunner().invoke(command, [str(a) for a in args], input=input, catch_exceptions=catch_exceptions)
    if code is not None:
        assert result.exit_code == code, (result.exit_code, result.stderr, result.stdout)
    return result


def one_error_line(stderr: str, tool: str) -> str:
    """The single error line a refused command prints."""
    errors = [line for line in stderr.splitlines() if line.startswith(f"ssae-{tool}: error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def identity_sae(d: int, signed: bool = True):
    """An SAE whose latents are the coordinates of x.  signed: d_sae = 2d with encoders [I, -I] and
    decoders [I; -I], so relu(x) - relu(-x) = x reconstructs exactly; else d_sae = d, latent i = relu(x_i)."""
    import torch

    from ssae_common.sae.autoencoder import SAE

    eye = torch.eye(d)
    sae = SAE(d, 2 * d if signed else d)
    sae.W_enc.data = torch.cat([eye, -eye], 1) if signed else eye.clone()
    sae.W_dec.data = torch.cat([eye, -eye], 0) if signed else eye.clone()
    return sae


def random_sae(d_in: int, d_sae: int, seed: int = 0, architecture: str = "relu", k=None, act_scale: float = 1.0,
               dec_scale: float = 1.0, enc_bias: float | None = None, dec_bias: bool = True, group_sizes=None):
    """A seeded random SAE with unit-scale pre-activations.  enc_bias: a constant encoder bias (None: random
    around -0.2); dec_bias False leaves the decoder bias at zero; group_sizes: matryoshka-batchtopk's."""
    import math

    import torch

    from ssae_common.sae.autoencoder import SAE

    g = torch.Generator().manual_seed(seed)
    sae = SAE(d_in, d_sae, architecture, k, act_scale, group_sizes)
    sae.W_enc.data = torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in)
    sae.W_dec.data = torch.randn(d_sae, d_in, generator=g) * dec_scale / math.sqrt(d_sae)
    sae.b_enc.data = (torch.randn(d_sae, generator=g) * 0.1 - 0.2) if enc_bias is None else torch.full((d_sae,), enc_bias)
    if dec_bias:
        sae.b_dec.data = torch.randn(d_in, generator=g) * 0.1
    return sae


class StopAfter:
    """A StopFlag stand-in that asks for a stop after `n` steps."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def check(self, save=None):
        self.calls += 1
        if self.calls >= self.n:
            save()
            from ssae_common.core.errors import Interrupted

            raise Interrupted("test stop")
