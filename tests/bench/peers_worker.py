"""One trainer of bench_peers.py, as a persistent worker commanded over stdin/stdout (JSON lines).

    python peers_worker.py TRAINER SETUP.json

TRAINER is ssae, ssae-dense, saelens, saelens-sparse, sparsify or dictionary_learning; ssae's run under the
project's venv, the others under the peers venv.  SETUP holds the rows file (float32 .npy, memory-mapped),
the row order (.npy of row indices, batch i = rows[order[i*B:(i+1)*B]]) and the shared settings.  Commands:

    {"steps": N}       train the next N steps; answers {"cpu": process CPU seconds of those steps}
    {"weights": PATH}  save W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec, scale to PATH (.npz) in
                       one form, x_hat = topk(relu((x * scale - b_dec) @ W_enc + b_enc)) @ W_dec / scale
                       + b_dec / scale; answers {}
    {"quit": true}

Only the training step is timed (each library's own forward, backward, optimiser step and decoder
renormalisation); the batch is sliced from the rows before the clock starts, the same for every trainer.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time

import numpy as np
import torch


def ssae_trainer(s: dict, decoder: str):
    from ssae_common.sae.config import FitConfig
    from ssae_common.sae.train import init_sae
    from ssae_common.sae.trainer import Trainer

    cfg = FitConfig(architecture="topk", d_sae=s["d_sae"], k=s["k"], lr=s["lr"], batch_size=s["batch"],
                    train_tokens=s["batch"] * s["steps"], warmup_steps=0, decay_fraction=0.0, val_tokens=0,
                    decoder=decoder, seed=s["seed"]).resolve(d_in=s["d_in"], n_rows=s["batch"] * s["steps"])
    sae = init_sae(cfg, s["d_in"], s["sample"], None)  # act_scale and the geometric-median b_dec, as ssae-fit
    trainer = Trainer(cfg, sae, None, s["tmp"], np.empty((0, s["d_in"]), np.float32))

    def step(x: torch.Tensor) -> None:
        trainer.train_step(x * trainer.sae.act_scale)  # the run loop's scaling, then the real step

    def weights() -> dict:
        sae = trainer.sae
        return {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec, "scale": sae.act_scale}

    return step, weights


def saelens_trainer(s: dict, sparse: bool):
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    # use_sparse_activations with the default decoder-norm rescaling fails in backward under torch 2.13
    # (aten::view on a sparse tensor), so that variant runs without the rescaling
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=s["d_in"], d_sae=s["d_sae"], k=s["k"], dtype="float32",
                                                device="cpu", use_sparse_activations=sparse,
                                                rescale_acts_by_decoder_norm=not sparse))
    trainer = SAETrainer(SAETrainerConfig(total_training_samples=s["batch"] * s["steps"],
                                          train_batch_size_samples=s["batch"], lr=s["lr"], lr_end=s["lr"],
                                          device="cpu"),
                         sae, data_provider=iter(()))

    def step(x: torch.Tensor) -> None:
        trainer.step(x)  # what SAETrainer.fit does per batch
        trainer.n_training_steps += 1

    def weights() -> dict:
        folded = copy.deepcopy(sae)
        if folded.cfg.rescale_acts_by_decoder_norm:
            folded.fold_W_dec_norm()
        b_enc = folded.b_enc.detach()
        if not folded.cfg.apply_b_dec_to_input:
            b_enc = b_enc + folded.b_dec.detach() @ folded.W_enc.detach()
        return {"W_enc": folded.W_enc, "b_enc": b_enc, "W_dec": folded.W_dec, "b_dec": folded.b_dec, "scale": 1.0}

    return step, weights


def sparsify_trainer(s: dict):
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(s["d_in"], SparseCoderConfig(num_latents=s["d_sae"], k=s["k"]), "cpu", dtype=torch.float32)
    opt = torch.optim.Adam(coder.parameters(), lr=s["lr"])
    state = {"step": 0}

    def step(x: torch.Tensor) -> None:  # sparsify.Trainer.fit's step, less the language model around it
        if state["step"] == 0:
            coder.b_dec.data = x.mean(0)
        coder.set_decoder_norm_to_unit_norm()
        out = coder(x)
        out.fvu.backward()  # loss = fvu + auxk_alpha (0 by default) * auxk + multi_topk_fvu (off) / 8
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        state["step"] += 1

    def weights() -> dict:
        return {"W_enc": coder.encoder.weight.T, "b_enc": coder.encoder.bias, "W_dec": coder.W_dec,
                "b_dec": coder.b_dec, "scale": 1.0}

    return step, weights


def dictionary_learning_trainer(s: dict):
    import types

    sys.modules.setdefault("nnsight", types.SimpleNamespace(LanguageModel=object))  # its activation buffer's only
    from dictionary_learning.trainers.top_k import TopKTrainer

    trainer = TopKTrainer(steps=s["steps"], activation_dim=s["d_in"], dict_size=s["d_sae"], k=s["k"], layer=6,
                          lm_name="smollm2", lr=s["lr"], warmup_steps=0, seed=s["seed"], device="cpu")
    state = {"step": 0}

    def step(x: torch.Tensor) -> None:
        trainer.update(state["step"], x)
        state["step"] += 1

    def weights() -> dict:
        ae = trainer.ae
        return {"W_enc": ae.encoder.weight.T, "b_enc": ae.encoder.bias, "W_dec": ae.decoder.weight.T,
                "b_dec": ae.b_dec, "scale": 1.0}

    return step, weights


TRAINERS = {"ssae": lambda s: ssae_trainer(s, "sparse"), "ssae-dense": lambda s: ssae_trainer(s, "dense"),
            "saelens": lambda s: saelens_trainer(s, False), "saelens-sparse": lambda s: saelens_trainer(s, True),
            "sparsify": sparsify_trainer, "dictionary_learning": dictionary_learning_trainer}


def main() -> None:
    name, setup = sys.argv[1], json.load(open(sys.argv[2]))
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the libraries' prints go to stderr; stdout carries the answers only
    torch.set_num_threads(1)
    rows, order = np.load(setup["rows"], mmap_mode="r"), np.load(setup["order"])
    setup["sample"] = np.ascontiguousarray(rows[order[:setup["init_rows"]]])
    torch.manual_seed(setup["seed"])
    try:
        step, weights = TRAINERS[name](setup)
    except ImportError as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), file=reply, flush=True)
        return
    print(json.dumps({"ready": True}), file=reply, flush=True)
    done, batch = 0, setup["batch"]
    for line in sys.stdin:
        cmd = json.loads(line)
        if "steps" in cmd:
            cpu = 0.0
            for _ in range(cmd["steps"]):
                x = torch.from_numpy(rows[np.sort(order[done * batch:(done + 1) * batch])])
                start = time.process_time()
                step(x)
                cpu += time.process_time() - start
                done += 1
            print(json.dumps({"cpu": cpu}), file=reply, flush=True)
        elif "weights" in cmd:
            w = weights()
            np.savez(cmd["weights"], **{k: v.detach().float().cpu().numpy() if torch.is_tensor(v) else np.float32(v)
                                        for k, v in w.items()})
            print(json.dumps({}), file=reply, flush=True)
        else:
            return


if __name__ == "__main__":
    main()
