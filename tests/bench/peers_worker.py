"""One trainer of bench_peers.py, as a persistent worker commanded over stdin/stdout (JSON lines).

    python peers_worker.py SPEC SETUP.json

SPEC is ssae[+FIELD=VALUE...] (ssae-fit's defaults with some options changed; run under the project's venv) or
saelens, sparsify or dictionary_learning, each with its own recipe, or with @ssae: ssae's recipe (run under the
peers venv); a peer's one knob is +sparsity=V, its JumpReLU sparsity setting (SAELens's l0_coefficient,
dictionary_learning's target_l0; ssae's is +l0=V).  SETUP holds the architecture (topk, batchtopk or
jumprelu), the rows file (float32 .npy, memory-mapped), the row order (.npy of row indices, batch i =
rows[order[i*B:(i+1)*B]]), the shared settings, and ssae's recipe as the bench computed it with ssae's own
functions (learning rate, schedule factors per step, act_scale, the geometric-median b_dec).  Commands:

    {"steps": N}       train the next N steps; answers {"cpu": process CPU seconds of those steps}
    {"weights": PATH}  save W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec, scale (and threshold
                       [d_sae] for batchtopk and jumprelu) to PATH (.npz) in one form: pre = (x * scale - b_dec)
                       @ W_enc + b_enc; f = topk(relu(pre)) (topk) or relu(pre) * (pre > threshold) (the
                       others, at inference); x_hat = (f @ W_dec + b_dec) / scale; answers {}
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


def parse_knobs(spec: str) -> tuple[str, str, dict]:
    """'name[@recipe][+key=value...]' -> (name, recipe, knobs); recipe is 'own' (the library's standard one)
    or 'ssae' (ssae's schedule, input scaling and decoder-bias start on a peer)."""
    head, *pairs = spec.split("+")
    name, _, recipe = head.partition("@")
    return name, recipe or "own", dict(pair.split("=", 1) for pair in pairs)


def ssae_trainer(s: dict, knobs: dict):
    import dataclasses

    from ssae_common.sae.config import FitConfig
    from ssae_common.sae.train import init_sae
    from ssae_common.sae.trainer import Trainer

    # knobs: FitConfig fields (the ablations), plus `clip=C` (global gradient-norm clip at C before Adam, as
    # dictionary_learning and SAELens do at 1, in ssae's units), `dec_init=uniform` (decoder rows from
    # nn.Linear's uniform init, as dictionary_learning) and `beta2=B` (Adam's)
    types = {f.name: type(f.default) for f in dataclasses.fields(FitConfig)}
    extra = {key: knobs.pop(key) for key in ("clip", "dec_init", "beta2") if key in knobs}

    def value(key: str, text: str):
        if types.get(key) is bool:
            return text.lower() in ("1", "true", "yes")
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text
    over = {key: value(key, text) for key, text in knobs.items()}
    architecture = s.get("architecture", "topk")
    cfg = FitConfig(architecture=architecture, d_sae=s["d_sae"], k=None if architecture == "jumprelu" else s["k"],
                    batch_size=s["batch"], train_tokens=s["batch"] * s["steps"], val_tokens=0, seed=s["seed"],
                    **over).resolve(d_in=s["d_in"], n_rows=s["batch"] * s["steps"])
    sae = init_sae(cfg, s["d_in"], s["sample"], None)  # act_scale and the geometric-median b_dec, as ssae-fit
    if extra.get("dec_init") == "uniform":
        with torch.no_grad():
            w = torch.nn.Linear(s["d_sae"], s["d_in"], bias=False).weight.T.contiguous()
            sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
            sae.W_enc.copy_(sae.W_dec.T)
    trainer = Trainer(cfg, sae, None, s["tmp"], np.empty((0, s["d_in"]), np.float32))
    if "beta2" in extra:
        trainer.opt.betas = (trainer.opt.betas[0], float(extra["beta2"]))
    if "clip" in extra:
        limit, adam_step = float(extra["clip"]), trainer.opt.step

        def clipped(lr: float) -> None:
            torch.nn.utils.clip_grad_norm_(trainer.opt.params, limit)
            adam_step(lr)
        trainer.opt.step = clipped

    def step(x: torch.Tensor) -> None:
        trainer.train_step(x * trainer.sae.act_scale)  # the run loop's scaling, then the real step

    def weights() -> dict:
        sae = trainer.sae
        w = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec, "scale": sae.act_scale}
        return {**w, "threshold": sae.threshold} if sae.arch.threshold else w

    return step, weights


def ssae_recipe(s: dict, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """ssae's learning-rate schedule (the factors the bench computed with sae.train.lr_at) on a peer's optimiser."""
    factors = s["ssae_schedule"]
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = s["ssae_lr"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: factors[min(i, len(factors) - 1)])


def saelens_trainer(s: dict, recipe: str, knobs: dict):
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    ours, architecture = recipe == "ssae", s.get("architecture", "topk")
    # own: SAELens 6's defaults (Adam 3e-4 constant, zero b_dec, decoder rows of norm 0.1, raw inputs,
    # gradient-norm clip 1; TopK and BatchTopK: activations rescaled by the decoder norm, AuxK after 1000 steps
    # unfired; JumpReLU: threshold 0.01, bandwidth 0.05, the "step" L0 loss, l0_coefficient +sparsity (1));
    # ssae: unit rows, b_dec at ssae's geometric median, normalised inputs, ssae's learning rate and schedule
    shared = dict(d_in=s["d_in"], d_sae=s["d_sae"], dtype="float32", device="cpu",
                  **({"decoder_init_norm": 1.0} if ours else {}))
    if architecture == "topk":
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=s["k"], **shared))
    elif architecture == "batchtopk":
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=s["k"], **shared))
    else:
        from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(l0_coefficient=float(knobs.get("sparsity", 1.0)),
                                                            **shared))
    # lr_end: LanguageModelSAERunnerConfig's default (lr / 10, used by the cosine scheduler only)
    trainer = SAETrainer(SAETrainerConfig(total_training_samples=s["batch"] * s["steps"],
                                          train_batch_size_samples=s["batch"], lr=3e-4, lr_end=3e-5, device="cpu"),
                         sae, data_provider=iter(()))
    scale = s["ssae_act_scale"] if ours else 1.0
    if ours:
        sae.b_dec.data = torch.from_numpy(np.load(s["ssae_b_dec"]))
        trainer.lr_scheduler = ssae_recipe(s, trainer.optimizer)

    def step(x: torch.Tensor) -> None:
        trainer.step(x * scale)  # what SAETrainer.fit does per batch
        trainer.n_training_steps += 1

    def weights() -> dict:
        folded = copy.deepcopy(sae)
        if getattr(folded.cfg, "rescale_acts_by_decoder_norm", False):
            folded.fold_W_dec_norm()  # JumpReLU's fold moves its threshold with the rows
        b_enc = folded.b_enc.detach()
        if not folded.cfg.apply_b_dec_to_input:
            b_enc = b_enc + folded.b_dec.detach() @ folded.W_enc.detach()
        w = {"W_enc": folded.W_enc, "b_enc": b_enc, "W_dec": folded.W_dec, "b_dec": folded.b_dec, "scale": scale}
        if architecture == "batchtopk":  # saved for inference as JumpReLU, the running topk_threshold on every latent
            w["threshold"] = folded.topk_threshold.float().expand(s["d_sae"])
        elif architecture == "jumprelu":
            w["threshold"] = folded.threshold
        return w

    return step, weights


def sparsify_trainer(s: dict, recipe: str, knobs: dict):
    from sparsify import SparseCoder, SparseCoderConfig

    ours = recipe == "ssae"
    coder = SparseCoder(s["d_in"], SparseCoderConfig(num_latents=s["d_sae"], k=s["k"]), "cpu", dtype=torch.float32)
    scheduler = None
    if ours:  # Adam at ssae's rate and schedule, normalised inputs, b_dec at ssae's geometric median
        opt = torch.optim.Adam(coder.parameters(), lr=s["ssae_lr"])
        scheduler = ssae_recipe(s, opt)
        coder.b_dec.data = torch.from_numpy(np.load(s["ssae_b_dec"]))
    else:  # sparsify.Trainer's default: sign-SGD under schedule-free averaging (momentum 0.95), no schedule
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        opt = ScheduleFreeWrapper(SignSGD([{"params": coder.parameters(),
                                            "lr": 5e-3 / (s["d_sae"] / 2**14) ** 0.5}]), momentum=0.95)
        opt.train()
    scale = s["ssae_act_scale"] if ours else 1.0
    state = {"step": 0}

    def step(x: torch.Tensor) -> None:  # sparsify.Trainer.fit's step, less the language model around it
        x = x * scale
        if state["step"] == 0 and not ours:
            coder.b_dec.data = x.mean(0)
        coder.set_decoder_norm_to_unit_norm()
        out = coder(x)
        out.fvu.backward()  # loss = fvu + auxk_alpha (0 by default) * auxk + multi_topk_fvu (off) / 8
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
        state["step"] += 1

    def weights() -> dict:
        if not ours:
            opt.eval()  # schedule-free: the averaged weights are the model's
        w = {"W_enc": coder.encoder.weight.T.clone(), "b_enc": coder.encoder.bias.clone(), "W_dec": coder.W_dec.clone(),
             "b_dec": coder.b_dec.clone(), "scale": scale}
        if not ours:
            opt.train()
        return w

    return step, weights


def dictionary_learning_trainer(s: dict, recipe: str, knobs: dict):
    import types

    sys.modules.setdefault("nnsight", types.SimpleNamespace(LanguageModel=object))  # its activation buffer's only
    from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
    from dictionary_learning.trainers.jumprelu import JumpReluTrainer
    from dictionary_learning.trainers.top_k import TopKTrainer

    ours, architecture = recipe == "ssae", s.get("architecture", "topk")
    # own: each trainer's defaults with its step counts sized to the run as their demo sizes them to theirs:
    # the lr warm-up 1000 steps or a tenth of a shorter run (TopK, BatchTopK: their lr rule, no decay, AuxK
    # after 10M tokens unfired, b_dec at the first batch's geometric median; BatchTopK's threshold, an average
    # at rate 0.001 of the smallest kept activation, from step 1000 or a tenth of a shorter run); JumpReLU: Adam
    # 7e-5 (betas 0, 0.999), no decay, threshold 0.001, bandwidth 0.001, the L0 loss (L0 / target_l0 - 1)^2
    # with target_l0 +sparsity (20), warmed up over 2000 steps or a fifth of a shorter run, b_dec 0.  All clip
    # the gradient norm at 1
    warm = dict(steps=s["steps"], activation_dim=s["d_in"], dict_size=s["d_sae"], layer=6, lm_name="smollm2",
                warmup_steps=min(1000, s["steps"] // 10), seed=s["seed"], device="cpu")
    if architecture == "topk":
        trainer = TopKTrainer(k=s["k"], **warm)
    elif architecture == "batchtopk":
        trainer = BatchTopKTrainer(k=s["k"], threshold_start_step=min(1000, s["steps"] // 10), **warm)
    else:
        trainer = JumpReluTrainer(target_l0=float(knobs.get("sparsity", 20.0)),
                                  sparsity_warmup_steps=min(2000, s["steps"] // 5), **warm)
        if ours:  # the others start b_dec at a median of their own
            trainer.ae.b_dec.data = torch.from_numpy(np.load(s["ssae_b_dec"]))
    if ours:
        trainer.scheduler = ssae_recipe(s, trainer.optimizer)
    scale = s["ssae_act_scale"] if ours else 1.0
    state = {"step": 0}

    def step(x: torch.Tensor) -> None:
        trainer.update(state["step"], x * scale)
        state["step"] += 1

    def weights() -> dict:
        ae = trainer.ae
        if architecture == "jumprelu":  # JumpReluAutoEncoder encodes x, not x - b_dec
            return {"W_enc": ae.W_enc, "b_enc": ae.b_enc + ae.b_dec @ ae.W_enc, "W_dec": ae.W_dec, "b_dec": ae.b_dec,
                    "threshold": ae.threshold, "scale": scale}
        w = {"W_enc": ae.encoder.weight.T, "b_enc": ae.encoder.bias, "W_dec": ae.decoder.weight.T,
             "b_dec": ae.b_dec, "scale": scale}
        if architecture == "batchtopk":  # BatchTopKSAE.encode's default at inference: relu(pre) > threshold
            w["threshold"] = ae.threshold.float().expand(s["d_sae"])
        return w

    return step, weights


TRAINERS = {"ssae": ssae_trainer, "saelens": saelens_trainer, "sparsify": sparsify_trainer,
            "dictionary_learning": dictionary_learning_trainer}


def main() -> None:
    name, setup = sys.argv[1], json.load(open(sys.argv[2]))
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the libraries' prints go to stderr; stdout carries the answers only
    torch.set_num_threads(1)
    rows, order = np.load(setup["rows"], mmap_mode="r"), np.load(setup["order"])
    setup["sample"] = np.ascontiguousarray(rows[order[:setup["init_rows"]]])
    torch.manual_seed(setup["seed"])
    name, recipe, knobs = parse_knobs(name)
    try:
        step, weights = TRAINERS[name](setup, knobs) if name == "ssae" else TRAINERS[name](setup, recipe, knobs)
    except ImportError as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), file=reply, flush=True)
        return
    del setup["sample"]  # the initialisation's only
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
