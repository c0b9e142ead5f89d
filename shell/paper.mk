# The paper's experiments (Muhamed et al., arXiv 2411.00743) as Make targets: `make -C shell paper`.
# Every size, the model, hook, data and device are variables, so a GPU user scales up without edits:
#   make -C shell paper CORPUS=hf:Skylion007/openwebtext MODEL=EleutherAI/pythia-70m-deduped \
#        HOOK=blocks.3.hook_resid_post DEVICE=cuda GENERAL_TOKENS=50000000 GSAE_TOKENS=500000000
# Targets are files; a rerun with nothing changed does nothing; each step's log is beside its output.
DATA ?= $(abspath $(ROOT)/../shared/data)
ifneq ($(wildcard $(DATA)/general/pool.jsonl.gz),)
CORPUS ?= $(DATA)/general/pool.jsonl.gz
SEEDS ?= $(DATA)/physics/astro_ph_seeds.jsonl
TEST ?= $(DATA)/physics/astro_ph_test.jsonl.gz
INDOMAIN ?= $(DATA)/physics/astro_ph_extra.jsonl.gz
OOD_TEST ?= $(DATA)/physics/mmlu_physics_questions.jsonl
BIOS ?= $(DATA)/bios/bias_in_bios_600.jsonl
PROFESSIONS ?= nurse physician,surgeon
else
CORPUS ?= hf:Skylion007/openwebtext
SEEDS ?= $(ROOT)/shell/data/physics_seeds.txt
TEST ?= $(ROOT)/shell/data/physics_test.txt
INDOMAIN ?= hf:ccdv/arxiv-summarization
OOD_TEST ?= $(ROOT)/shell/data/physics_test.txt
BIOS ?= hf:LabHC/bias_in_bios:test
PROFESSIONS ?= professor nurse
endif
MED_SEEDS ?= $(ROOT)/shell/data/medical_seeds.txt
# The second domain, toxicity: ../shared's labelled tweets split into retrieval seeds, held-out test and
# in-domain text (shell/paper_page.py split); without ../shared, the texts in shell/data (no in-domain set).
ifneq ($(wildcard $(DATA)/toxicity/toxicity.jsonl.gz),)
TOX_DATA ?= $(DATA)/toxicity/toxicity.jsonl.gz
TOX_SEEDS ?= $(PAPER)/toxicity/data/seeds.jsonl
TOX_TEST ?= $(PAPER)/toxicity/data/test.jsonl
TOX_INDOMAIN ?= $(PAPER)/toxicity/data/indomain.jsonl
else
TOX_SEEDS ?= $(ROOT)/shell/data/toxicity_seeds.txt
TOX_TEST ?= $(ROOT)/shell/data/toxicity_test.txt
TOX_INDOMAIN ?=
endif
MODEL ?= smollm2
HOOK ?= blocks.6.hook_resid_post
DEVICE ?= auto
# `make paper-quick` is `make paper QUICK=1`: the same page at small sizes, in its own folder
ifeq ($(QUICK),1)
PAPER ?= $(ROOT)/ssae-work/paper-quick
GENERAL_TOKENS ?= 100000
GSAE_TOKENS ?= 300000
SUB_DOCS ?= 400
SUB_TOKENS ?= 40000
SSAE_TOKENS ?= 100000
EVAL_TOKENS ?= 6000
TAIL_TOKENS ?= 24000
BATCH_SIZE ?= 1024
K_SWEEP ?= 8 64
RECIPES ?= bm25 indomain
SHIFT_SEEDS ?= 3
endif
PAPER ?= $(ROOT)/ssae-work/paper
GENERAL_TOKENS ?= 600000
GSAE_TOKENS ?= 1000000
SUB_DOCS ?= 1500
SUB_TOKENS ?= 150000
SSAE_TOKENS ?= 500000
# MiniLM's own limit is 256 tokens; 128 halves the dense encoding of the corpus (the longest CPU step)
DENSE_MAX_LENGTH ?= 128
EXPANSION ?= 4
K ?= 32
K_SWEEP ?= 8 64
RECIPES ?= bm25 dense dense_tracin indomain
EVAL_TOKENS ?= 15000
# the tail metrics need many tokens and cost no forward pass above the hook: 4x the perplexity tokens
TAIL_TOKENS ?= 60000
BATCH_SIZE ?= 4096
FIT_ARGS ?= --architecture topk --expansion $(EXPANSION) --batch-size $(BATCH_SIZE)
EVERY := --model $(MODEL) --device $(DEVICE)
# The scoreboard: the domains, the seeds every comparison is paired over (>= 3 for a verdict), the TERM
# settings beside ERM (t0) for the GSAEs from scratch and the SSAEs (ess<F>: --tilt-ess F, the recommended
# TERM; t<T>: --tilt T, the paper's own 500 and 1e9), the recipe whose SSAEs are tilted, the longer-budget
# point (LONG_TERM and ERM at LONG_FACTOR x SSAE_TOKENS) and the TERM of the k sweep's SSAEs.
DOMAINS ?= physics toxicity
BOARD_SEEDS ?= 0 1 2
TERMS ?= ess0.5 t500 t1e9
RECIPE ?= bm25
LONG_FACTOR ?= 5
LONG_TERM ?= ess0.5
LONG_DOMAINS ?= $(firstword $(DOMAINS))
PARETO_TERM ?= ess0.5

P := $(PAPER)
# run a tool with its stderr in OUTPUT.log (shown on failure)
logged = mkdir -p $(dir $(2)) && { $(1); } 2> $(2).log || { tail -n 20 $(2).log >&2; exit 1; }
# a Make list as ssae-fit's comma-separated one: a sweep trains every SAE of a rule in one call, from one
# read of the data per seed, into folders named by a template (-o DIR/x-t{tilt}; values as ssae-fit
# writes them: 0 500 1e9 0.5, so write the variables' values that way, not 1e3 or 5e2)
comma := ,
commas = $(subst $() ,$(comma),$(strip $(1)))
# a setting's flags: erm or t0 (none), t<T> (--tilt T), ess<F> (--tilt-ess F), type-<setting> (by token type)
setting_flags = $(if $(filter ess%,$(1)),--tilt-ess $(patsubst ess%,%,$(1)),$(if $(filter erm t0,$(1)),,--tilt $(patsubst t%,%,$(1))))
tilt_flags = $(if $(filter type-%,$(1)),--tilt-groups token )$(call setting_flags,$(patsubst type-%,%,$(1)))
# the --tilt values (ERM's 0 first) and the --tilt-ess values of a list of settings
t_values = 0 $(filter-out 0,$(patsubst t%,%,$(filter t%,$(1))))
ess_values = $(patsubst ess%,%,$(filter ess%,$(1)))

# per domain: retrieval seeds, held-out test text, what retrieval excludes, in-domain text, data to build first
SEEDS_physics = $(SEEDS)
TEST_physics = $(TEST)
EXCLUDE_physics = --exclude $(TEST) --exclude $(OOD_TEST)
INDOMAIN_physics = $(INDOMAIN)
SEEDS_toxicity = $(TOX_SEEDS)
TEST_toxicity = $(TOX_TEST)
EXCLUDE_toxicity = --exclude $(TOX_TEST)
INDOMAIN_toxicity = $(TOX_INDOMAIN)
# the split files are made here; any other path is the user's
built = $(filter $(P)/%,$(1))
recipes_of = $(if $(INDOMAIN_$(1)),$(RECIPES),$(filter-out indomain,$(RECIPES)))
D1 := $(firstword $(DOMAINS))

GSAE_T := $(call t_values,$(TERMS))
GSAE_ESS := $(call ess_values,$(TERMS))
gsae = $(P)/gsae/s$(1)/gsae-t0
gsaes_of = $(foreach t,$(GSAE_T),$(P)/gsae/s$(1)/gsae-t$(t)) $(foreach f,$(GSAE_ESS),$(P)/gsae/s$(1)/gsae-ess$(f))
# the SSAE folders of domain $(1), seed $(2)
ssaes_of = $(foreach t,$(GSAE_T),$(P)/$(1)/s$(2)/ssae-$(RECIPE)-t$(t)) \
	$(foreach f,$(GSAE_ESS),$(P)/$(1)/s$(2)/ssae-$(RECIPE)-ess$(f)) \
	$(foreach r,$(filter-out $(RECIPE),$(call recipes_of,$(1))),$(P)/$(1)/s$(2)/ssae-$(r)-t0) \
	$(if $(filter $(1),$(LONG_DOMAINS)),$(P)/$(1)/s$(2)/ssae-$(RECIPE)-long-t0 $(P)/$(1)/s$(2)/ssae-$(RECIPE)-long-$(LONG_TERM))
# the SAEs whose spliced perplexity a claim compares (Fig. 1): the ERM GSAE and each recipe's ERM SSAE
ppl_saes_of = $(call gsae,$(2)) $(foreach r,$(call recipes_of,$(1)),$(P)/$(1)/s$(2)/ssae-$(r)-t0)
EVALS := $(foreach d,$(DOMAINS),$(foreach s,$(BOARD_SEEDS),$(P)/$(d)/eval-s$(s)/metrics.json $(P)/$(d)/tail-s$(s)/metrics.json))
PARETO_EVALS := $(if $(strip $(K_SWEEP)),$(foreach s,$(BOARD_SEEDS),$(P)/pareto/eval-s$(s)/metrics.json))

.PHONY: paper paper-quick paper-gsae paper-ssae paper-eval paper-sweep paper-shift
# the page; its verdicts (also paper/verdicts.txt) on stdout
paper: $(P)/paper/index.html
	@cat $(P)/paper/verdicts.txt
	@echo "paper: $(P)/paper/index.html; every evaluation's own report is beside its metrics.json" >&2
paper-quick:
	$(MAKE) --no-print-directory paper QUICK=1
paper-gsae: $(foreach s,$(BOARD_SEEDS),$(addsuffix /cfg.json,$(call gsaes_of,$(s))))
paper-ssae: $(foreach d,$(DOMAINS),$(foreach s,$(BOARD_SEEDS),$(addsuffix /cfg.json,$(call ssaes_of,$(d),$(s)))))
paper-eval: $(EVALS)
paper-sweep: $(PARETO_EVALS)
paper-shift: $(P)/shift/shift.json

$(P)/paper/index.html: $(EVALS) $(PARETO_EVALS) $(P)/shift/shift.json $(ROOT)/ssae_common/eval/paper.py
	mkdir -p $(@D)
	$(PY) $(ROOT)/shell/paper_page.py score $(P) $(@D) --domains $(DOMAINS) --seeds $(BOARD_SEEDS) --terms $(TERMS) --recipes $(RECIPES) --recipe $(RECIPE) --long-term $(LONG_TERM) --ks $(K_SWEEP) > $(@D)/verdicts.txt

$(P)/general.h5:
	mkdir -p $(@D)
	$(call logged,ssae-harvest $(CORPUS) $(EVERY) --hook $(HOOK) --max-tokens $(GENERAL_TOKENS) --force -o $@ > /dev/null,$@)

# GSAEs from scratch on the general text, every seed of a kind (ERM and --tilt T; --tilt-ess F) in one call
$(foreach s,$(BOARD_SEEDS),$(foreach t,$(GSAE_T),$(P)/gsae/s$(s)/gsae-t$(t)/cfg.json)) &: $(P)/general.h5
	$(call logged,ssae-fit $< $(FIT_ARGS) --k $(K) --tilt $(call commas,$(GSAE_T)) --seed $(call commas,$(BOARD_SEEDS)) --train-tokens $(GSAE_TOKENS) --device $(DEVICE) --force -o $(P)/gsae/s{seed}/gsae-t{tilt} > /dev/null,$(P)/gsae/t)
ifneq ($(GSAE_ESS),)
$(foreach s,$(BOARD_SEEDS),$(foreach f,$(GSAE_ESS),$(P)/gsae/s$(s)/gsae-ess$(f)/cfg.json)) &: $(P)/general.h5
	$(call logged,ssae-fit $< $(FIT_ARGS) --k $(K) --tilt-ess $(call commas,$(GSAE_ESS)) --seed $(call commas,$(BOARD_SEEDS)) --train-tokens $(GSAE_TOKENS) --device $(DEVICE) --force -o $(P)/gsae/s{seed}/gsae-ess{tilt_ess} > /dev/null,$(P)/gsae/ess)
endif

$(P)/toxicity/data/seeds.jsonl $(P)/toxicity/data/test.jsonl $(P)/toxicity/data/indomain.jsonl &: $(TOX_DATA)
	$(call logged,$(PY) $(ROOT)/shell/paper_page.py split $(TOX_DATA) $(@D),$(@D)/split)

# per domain: documents by each retrieval recipe (the test set never leaks in), their activations
define domain_rule
$(P)/$(1)/docs/bm25.jsonl $(P)/$(1)/docs/dense.jsonl: $(P)/$(1)/docs/%.jsonl: $(call built,$(SEEDS_$(1)) $(TEST_$(1)))
	mkdir -p $$(@D)
	$$(call logged,ssae-retrieve $(SEEDS_$(1)) --corpus $(CORPUS) --method $$* --dense-max-length $(DENSE_MAX_LENGTH) --top-k $(SUB_DOCS) $(EXCLUDE_$(1)) --force -o $$@ > /dev/null,$$@)
$(P)/$(1)/docs/dense_tracin.jsonl: $(call gsae,0)/cfg.json $(call built,$(SEEDS_$(1)) $(TEST_$(1)))
	mkdir -p $$(@D)
	$$(call logged,ssae-retrieve $(SEEDS_$(1)) --corpus $(CORPUS) --method dense --dense-max-length $(DENSE_MAX_LENGTH) --top-k $(SUB_DOCS) $(EXCLUDE_$(1)) --rerank tracin --sae $(call gsae,0) $(EVERY) --force -o $$@ > /dev/null,$$@)
$(P)/$(1)/acts/%.h5: $(P)/$(1)/docs/%.jsonl
	$$(call logged,ssae-harvest $$< $(EVERY) --hook $(HOOK) --max-tokens $(SUB_TOKENS) --force -o $$@ > /dev/null,$$@)
# the held-out text's activations for the tail metrics (ssae-harvest never reads past what it needs)
$(P)/$(1)/acts/heldout-test.h5: $(call built,$(TEST_$(1)))
	$$(call logged,ssae-harvest $(TEST_$(1)) $(EVERY) --hook $(HOOK) --max-tokens $(TAIL_TOKENS) --force -o $$@ > /dev/null,$$@)
# the "train on in-domain data directly" baseline
$(P)/$(1)/acts/indomain.h5: $(call built,$(INDOMAIN_$(1)))
	$$(call logged,ssae-harvest $(INDOMAIN_$(1)) $(EVERY) --hook $(HOOK) --max-tokens $(SUB_TOKENS) --force -o $$@ > /dev/null,$$@)
$(foreach s,$(BOARD_SEEDS),$(eval $(call seed_rule,$(1),$(s)))$(if $(GSAE_ESS),$(eval $(call seed_ess_rule,$(1),$(s)))))
endef

# per domain and seed: SSAEs finetuned from that seed's ERM GSAE (RECIPE's text by ERM and every TERM setting,
# the other recipes' by ERM, the longer budget), and two ssae-evals on the held-out text: every GSAE and SSAE on
# its activations (tail-s: the tail, entropy, activation and dead-latent metrics, cheap, so on TAIL_TOKENS) and
# the SAEs of Fig. 1 on its documents (eval-s: the spliced perplexity costs a forward pass above the hook per SAE)
ssae_fit = ssae-fit $(1) --init $(call gsae,$(2)) --lr 3e-4 --batch-size $(BATCH_SIZE) --seed $(2) --device $(DEVICE) --force
define seed_rule
$(foreach t,$(GSAE_T),$(P)/$(1)/s$(2)/ssae-$(RECIPE)-t$(t)/cfg.json) &: $(P)/$(1)/acts/$(RECIPE).h5 $(call gsae,$(2))/cfg.json
	$$(call logged,$$(call ssae_fit,$$<,$(2)) --tilt $$(call commas,$(GSAE_T)) --train-tokens $(SSAE_TOKENS) -o $(P)/$(1)/s$(2)/ssae-$(RECIPE)-t{tilt} > /dev/null,$(P)/$(1)/s$(2)/ssae-$(RECIPE)-t)
$(P)/$(1)/s$(2)/ssae-%-t0/cfg.json: $(P)/$(1)/acts/%.h5 $(call gsae,$(2))/cfg.json
	$$(call logged,$$(call ssae_fit,$$<,$(2)) --train-tokens $(SSAE_TOKENS) -o $$(@D) > /dev/null,$$(@D))
$(P)/$(1)/s$(2)/ssae-$(RECIPE)-long-%/cfg.json: $(P)/$(1)/acts/$(RECIPE).h5 $(call gsae,$(2))/cfg.json
	$$(call logged,$$(call ssae_fit,$$<,$(2)) $$(call setting_flags,$$*) --train-tokens $$$$(($(SSAE_TOKENS) * $(LONG_FACTOR))) -o $$(@D) > /dev/null,$$(@D))
$(P)/$(1)/tail-s$(2)/metrics.json: $(addsuffix /cfg.json,$(call gsaes_of,$(2)) $(call ssaes_of,$(1),$(2))) $(P)/$(1)/acts/heldout-test.h5
	$$(call logged,ssae-eval $(call gsaes_of,$(2)) $(call ssaes_of,$(1),$(2)) --baseline $(call gsae,$(2)) --activations $(P)/$(1)/acts/heldout-test.h5 --device $(DEVICE) --force -o $$(@D) > /dev/null,$$(@D))
$(P)/$(1)/eval-s$(2)/metrics.json: $(addsuffix /cfg.json,$(call ppl_saes_of,$(1),$(2))) $(call built,$(TEST_$(1)))
	$$(call logged,ssae-eval $(call ppl_saes_of,$(1),$(2)) --baseline $(call gsae,$(2)) --docs $(TEST_$(1)) --max-tokens $(EVAL_TOKENS) --device $(DEVICE) --force -o $$(@D) > /dev/null,$$(@D))
endef
define seed_ess_rule
$(foreach f,$(GSAE_ESS),$(P)/$(1)/s$(2)/ssae-$(RECIPE)-ess$(f)/cfg.json) &: $(P)/$(1)/acts/$(RECIPE).h5 $(call gsae,$(2))/cfg.json
	$$(call logged,$$(call ssae_fit,$$<,$(2)) --tilt-ess $$(call commas,$(GSAE_ESS)) --train-tokens $(SSAE_TOKENS) -o $(P)/$(1)/s$(2)/ssae-$(RECIPE)-ess{tilt_ess} > /dev/null,$(P)/$(1)/s$(2)/ssae-$(RECIPE)-ess)
endef
$(foreach d,$(DOMAINS),$(eval $(call domain_rule,$(d))))

# L0 sweep for the Pareto curves (first domain): GSAEs at each k of K_SWEEP, every seed in one ssae-fit, each
# finetuned by PARETO_TERM on RECIPE's text of that domain; per seed one ssae-eval on its held-out text
$(foreach s,$(BOARD_SEEDS),$(foreach k,$(K_SWEEP),$(P)/pareto/s$(s)/gsae-k$(k)/cfg.json)) &: $(P)/general.h5
	$(call logged,ssae-fit $< $(FIT_ARGS) --k $(call commas,$(K_SWEEP)) --seed $(call commas,$(BOARD_SEEDS)) --train-tokens $(GSAE_TOKENS) --device $(DEVICE) --force -o $(P)/pareto/s{seed}/gsae-k{k} > /dev/null,$(P)/pareto/gsae)

define pareto_rule
$(P)/pareto/s$(1)/ssae-k%/cfg.json: $(P)/$(D1)/acts/$(RECIPE).h5 $(P)/pareto/s$(1)/gsae-k%/cfg.json
	$$(call logged,ssae-fit $$< --init $(P)/pareto/s$(1)/gsae-k$$* $(call setting_flags,$(PARETO_TERM)) --train-tokens $(SSAE_TOKENS) --lr 3e-4 --batch-size $(BATCH_SIZE) --seed $(1) --device $(DEVICE) --force -o $$(@D) > /dev/null,$$(@D))
$(P)/pareto/eval-s$(1)/metrics.json: $(foreach k,$(K_SWEEP),$(P)/pareto/s$(1)/gsae-k$(k)/cfg.json $(P)/pareto/s$(1)/ssae-k$(k)/cfg.json) $(call built,$(TEST_$(D1)))
	$$(call logged,ssae-eval $(foreach k,$(K_SWEEP),$(P)/pareto/s$(1)/gsae-k$(k) $(P)/pareto/s$(1)/ssae-k$(k)) --docs $(TEST_$(D1)) --max-tokens $(EVAL_TOKENS) --device $(DEVICE) --force -o $$(@D) > /dev/null,$$(@D))
endef
$(foreach s,$(BOARD_SEEDS),$(eval $(call pareto_rule,$(s))))

# ---- SHIFT (Table 1): begin -------------------------------------------------------------------------
# The GSAE against two SSAEs finetuned from it on medical/biography text retrieved from the corpus by BM25
# (the bios are excluded, so no validation or test bio is trained on): ERM and TERM with SHIFT_TERM, a
# tilt_flags setting of the TERM sweep below (default ess0.5, `--tilt-ess 0.5`: the sweep found that a fixed
# --tilt 500 trains the same SAE as ERM at this scale, docs/benchmarks.md). Profession titles masked and
# the l2 probe; on the bundled bios also the specialty words and a 70/10/20 train/validation/test split
# per cell (the largest ambiguous training set that leaves 10 validation and 20 test bios a cell), so that
# the original probe leans on gender (docs/benchmarks.md has the measurements); SHIFT_SEEDS seeded splits, every number mean ± sd.
# --auto-min-drop 0: the gender signal is spread over many latents, so
# `auto` keeps adding while the gender AUC drops at all (up to --auto-max 25).
# The bundled bios: physician vs surgeon. Their nurse bios come from other sites' templates than their
# physician and surgeon bios ("Having more than N years of diverse experiences ...", "accepts insurance"),
# so nurse vs physician/surgeon is read from the template even with the titles masked (docs/shift.md).
ifeq ($(BIOS),$(DATA)/bios/bias_in_bios_600.jsonl)
SHIFT_PROFESSIONS ?= physician surgeon
SHIFT_BIOS_ARGS ?= --mask-specialties --test-fraction 0.2 --val-fraction 0.1
else
SHIFT_PROFESSIONS ?= $(PROFESSIONS)
endif
SHIFT_TERM ?= ess0.5
SHIFT_GSAE ?= $(call gsae,0)
SHIFT_SSAE_TOKENS ?= $(SSAE_TOKENS)
SHIFT_SEEDS ?= 5
SHIFT_ARGS ?= --mask-professions --probe l2 $(SHIFT_BIOS_ARGS) --auto-min-drop 0 --seeds $(SHIFT_SEEDS)
SHIFT_SSAES := $(P)/ssae/medical-erm/cfg.json $(P)/ssae/medical-$(SHIFT_TERM)/cfg.json

$(P)/docs/medical.jsonl:
	mkdir -p $(@D)
	$(call logged,ssae-retrieve $(MED_SEEDS) --corpus $(CORPUS) --method bm25 --top-k $(SUB_DOCS) --exclude $(BIOS) --force -o $@ > /dev/null,$@)

$(P)/acts/medical.h5: $(P)/docs/medical.jsonl
	$(call logged,ssae-harvest $< $(EVERY) --hook $(HOOK) --max-tokens $(SUB_TOKENS) --force -o $@ > /dev/null,$@)

$(P)/ssae/medical-%/cfg.json: $(P)/acts/medical.h5 $(SHIFT_GSAE)/cfg.json
	$(call logged,ssae-fit $< --init $(SHIFT_GSAE) $(call tilt_flags,$*) --train-tokens $(SHIFT_SSAE_TOKENS) --lr 3e-4 --batch-size $(BATCH_SIZE) --seed 0 --device $(DEVICE) --force -o $(@D) > /dev/null,$(@D))

$(P)/shift/shift.json: $(SHIFT_GSAE)/cfg.json $(SHIFT_SSAES)
	mkdir -p $(@D)
	$(call logged,ssae-shift --data $(BIOS) --professions $(SHIFT_PROFESSIONS) --sae gsae=$(SHIFT_GSAE) --sae ssae-erm=$(P)/ssae/medical-erm --sae ssae-term=$(P)/ssae/medical-$(SHIFT_TERM) --ablate auto $(SHIFT_ARGS) --device $(DEVICE) --force -o $@ > /dev/null,$@)
# ---- SHIFT (Table 1): end ---------------------------------------------------------------------------

# ---- TERM tilt sweep: `make -C shell paper-tilt` ----------------------------------------------------
# The same GSAE (TILT_GSAE) finetuned on the same subdomain text (TILT_RECIPE's activations) with the same
# budget, by ERM and by every TERM setting.  Per seed, two ssae-evals on the held-out TEST text: on its
# activations (TILT_TAIL_TOKENS; cheap, so enough tokens for the rarest-decile error and tail coverage) and
# on its documents (TILT_EVAL_TOKENS; the spliced perplexity costs a forward pass per SAE); the tables.
# A setting is a folder name: erm, t<T> (--tilt T), ess<F> (--tilt-ess F), type-t<T> / type-ess<F> (the
# same with --tilt-groups token).  Quick CPU size, e.g.:
#   make -C shell paper-tilt TILT_GSAE=path/to/gsae TILT_TOKENS=100000 TILT_EVAL_TOKENS=10000 TILT_SEEDS=0
TILT_GSAE ?= $(call gsae,0)
TILT_RECIPE ?= bm25
TILT_SETTINGS ?= erm t1 t10 t100 t500 t1e9 ess0.5 ess0.1 ess0.01 type-ess0.1
TILT_SEEDS ?= 0 1
TILT_TOKENS ?= $(SSAE_TOKENS)
TILT_BATCH ?= 1024
TILT_LR ?= 3e-4
TILT_EVAL_TOKENS ?= $(EVAL_TOKENS)
TILT_TAIL_TOKENS ?= $(EVAL_TOKENS)

TILT_EVALS := $(foreach s,$(TILT_SEEDS),$(P)/tilt/tail-s$(s)/metrics.json $(P)/tilt/eval-s$(s)/metrics.json)

.PHONY: paper-tilt
paper-tilt: $(P)/tilt/tables.txt
	@cat $< >&2
	@echo "paper-tilt: the tables are in $<; plots and definitions in $(P)/tilt/eval-s*/report.html" >&2

$(P)/tilt/tables.txt: $(TILT_EVALS)
	$(PY) -m ssae_tools.tables $^ > $@

# One ssae-fit per kind of setting (erm, t<T>, ess<F>, type-t<T>, type-ess<F>) over its values and the seeds:
# the settings of a seed share every batch.  tilt_values: the values of kind $(1) in TILT_SETTINGS
tilt_values = $(patsubst $(1)%,%,$(filter $(1)%,$(filter-out $(if $(filter type-%,$(1)),,type-%),$(TILT_SETTINGS))))
TILT_DEPS := $(P)/$(D1)/acts/$(TILT_RECIPE).h5 $(TILT_GSAE)/cfg.json
# $(1): the kind, $(2): its flags and values, $(3): the folder name template
define tilt_rule
$(foreach s,$(TILT_SEEDS),$(foreach v,$(or $(call tilt_values,$(1)),_),$(P)/tilt/s$(s)/$(1)$(v:_=)/cfg.json)) &: $(TILT_DEPS)
	$$(call logged,ssae-fit $$< --init $(TILT_GSAE) $(2)--train-tokens $(TILT_TOKENS) --lr $(TILT_LR) --batch-size $(TILT_BATCH) --seed $$(call commas,$(TILT_SEEDS)) --device $(DEVICE) --force -o $(P)/tilt/s{seed}/$(3) > /dev/null,$(P)/tilt/$(1))
endef
$(if $(filter erm,$(TILT_SETTINGS)),$(eval $(call tilt_rule,erm,,erm)))
$(foreach kind,t ess type-t type-ess,$(if $(call tilt_values,$(kind)),$(eval $(call tilt_rule,$(kind),$(if $(filter type-%,$(kind)),--tilt-groups token )$(if $(filter %ess,$(kind)),--tilt-ess,--tilt) $$(call commas,$(call tilt_values,$(kind))) ,$(kind){$(if $(filter %ess,$(kind)),tilt_ess,tilt)}))))

# the held-out text's activations (ssae-harvest never reads past what it needs)
$(P)/acts/tilt-test.h5:
	mkdir -p $(@D)
	$(call logged,ssae-harvest $(TEST) $(EVERY) --hook $(HOOK) --max-tokens $(TILT_TAIL_TOKENS) --force -o $@ > /dev/null,$@)

$(P)/tilt/tail-s%/metrics.json: $(P)/acts/tilt-test.h5 $(TILT_GSAE)/cfg.json $(foreach t,$(TILT_SETTINGS),$(P)/tilt/s%/$(t)/cfg.json)
	$(call logged,ssae-eval $(TILT_GSAE) $(foreach t,$(TILT_SETTINGS),$(P)/tilt/s$*/$(t)) --baseline $(TILT_GSAE) --activations $< --device $(DEVICE) --force -o $(@D) > /dev/null,$(@D))

$(P)/tilt/eval-s%/metrics.json: $(TILT_GSAE)/cfg.json $(foreach t,$(TILT_SETTINGS),$(P)/tilt/s%/$(t)/cfg.json)
	$(call logged,ssae-eval $(TILT_GSAE) $(foreach t,$(TILT_SETTINGS),$(P)/tilt/s$*/$(t)) --baseline $(TILT_GSAE) --docs $(TEST) --max-tokens $(TILT_EVAL_TOKENS) --device $(DEVICE) --force -o $(@D) > /dev/null,$(@D))
# ---- end of the TERM tilt sweep -----------------------------------------------------------------------
