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
MODEL ?= smollm2
HOOK ?= blocks.6.hook_resid_post
DEVICE ?= auto
PAPER ?= $(ROOT)/ssae-work/paper
GENERAL_TOKENS ?= 600000
GSAE_TOKENS ?= 2000000
SUB_DOCS ?= 1500
SUB_TOKENS ?= 150000
SSAE_TOKENS ?= 500000
# MiniLM's own limit is 256 tokens; 128 halves the dense encoding of the corpus (the longest CPU step)
DENSE_MAX_LENGTH ?= 128
EXPANSION ?= 4
K ?= 32
K_SWEEP ?= 8 16 64
TILTS ?= 0 500 1e9
RECIPES ?= bm25 dense dense_tracin indomain
EVAL_TOKENS ?= 30000
BATCH_SIZE ?= 4096
FIT_ARGS ?= --architecture topk --expansion $(EXPANSION) --batch-size $(BATCH_SIZE) --seed 0
EVERY := --model $(MODEL) --device $(DEVICE)

P := $(PAPER)
# run a tool with its stderr in OUTPUT.log (shown on failure)
logged = mkdir -p $(dir $(2)) && { $(1); } 2> $(2).log || { tail -n 20 $(2).log >&2; exit 1; }
# a Make list as ssae-fit's comma-separated one: a sweep trains every SAE of a rule in one call, from one
# read of the data per seed, into folders named by a template (-o DIR/x-t{tilt}; values as ssae-fit
# writes them: 0 500 1e9 0.5, so write the variables' values that way, not 1e3 or 5e2)
comma := ,
commas = $(subst $() ,$(comma),$(strip $(1)))

SSAES := $(foreach r,$(RECIPES),$(foreach t,$(TILTS),$(P)/ssae/$(r)-t$(t)/cfg.json))
SWEEP := $(foreach k,$(K_SWEEP),$(P)/sweep/gsae-k$(k)/cfg.json $(P)/sweep/ssae-k$(k)/cfg.json)

.PHONY: paper paper-gsae paper-ssae paper-eval paper-sweep paper-shift
paper: $(P)/tables.txt $(P)/tilt/tables.txt
	@cat $^ >&2
	@echo "paper: these tables are in $^; plots and definitions in $(P)/eval/*/report.html" >&2
paper-gsae: $(P)/gsae/cfg.json
paper-ssae: $(SSAES)
paper-eval: $(P)/eval/physics/metrics.json $(P)/eval/mmlu/metrics.json
paper-sweep: $(P)/eval/pareto/metrics.json
paper-shift: $(P)/shift/shift.json

# the subdomain sets' composition (by source, largest document) closes the tables
$(P)/tables.txt: $(P)/eval/physics/metrics.json $(P)/eval/mmlu/metrics.json $(P)/eval/pareto/metrics.json $(P)/shift/shift.json
	$(PY) -m ssae_tools.tables $^ > $@
	$(PY) -m ssae_tools.tables $(foreach r,$(RECIPES) medical,$(P)/acts/$(r).h5) >> $@

$(P)/general.h5:
	mkdir -p $(@D)
	$(call logged,ssae-harvest $(CORPUS) $(EVERY) --hook $(HOOK) --max-tokens $(GENERAL_TOKENS) --force -o $@ > /dev/null,$@)

$(P)/gsae/cfg.json: $(P)/general.h5
	$(call logged,ssae-fit $< $(FIT_ARGS) --k $(K) --train-tokens $(GSAE_TOKENS) --device $(DEVICE) --force -o $(@D) > /dev/null,$(@D))

# subdomain documents by each retrieval recipe; the test set never leaks in
$(P)/docs/bm25.jsonl $(P)/docs/dense.jsonl: $(P)/docs/%.jsonl:
	mkdir -p $(@D)
	$(call logged,ssae-retrieve $(SEEDS) --corpus $(CORPUS) --method $* --dense-max-length $(DENSE_MAX_LENGTH) --top-k $(SUB_DOCS) --exclude $(TEST) --exclude $(OOD_TEST) --force -o $@ > /dev/null,$@)

$(P)/docs/dense_tracin.jsonl: $(P)/gsae/cfg.json
	mkdir -p $(@D)
	$(call logged,ssae-retrieve $(SEEDS) --corpus $(CORPUS) --method dense --dense-max-length $(DENSE_MAX_LENGTH) --top-k $(SUB_DOCS) --exclude $(TEST) --exclude $(OOD_TEST) --rerank tracin --sae $(P)/gsae $(EVERY) --force -o $@ > /dev/null,$@)

$(P)/acts/%.h5: $(P)/docs/%.jsonl
	mkdir -p $(@D)
	$(call logged,ssae-harvest $< $(EVERY) --hook $(HOOK) --max-tokens $(SUB_TOKENS) --force -o $@ > /dev/null,$@)

# the "train on in-domain data directly" baseline
$(P)/acts/indomain.h5:
	mkdir -p $(@D)
	$(call logged,ssae-harvest $(INDOMAIN) $(EVERY) --hook $(HOOK) --max-tokens $(SUB_TOKENS) --force -o $@ > /dev/null,$@)

# SSAE = GSAE finetuned on a recipe's text, with ERM (t0) or TERM: every tilt of a recipe in one ssae-fit
define ssae_rule
$(foreach t,$(TILTS),$(P)/ssae/$(1)-t$(t)/cfg.json) &: $(P)/acts/$(1).h5 $(P)/gsae/cfg.json
	$$(call logged,ssae-fit $$< --init $(P)/gsae --tilt $$(call commas,$(TILTS)) --train-tokens $(SSAE_TOKENS) --lr 3e-4 --batch-size $(BATCH_SIZE) --seed 0 --device $(DEVICE) --force -o $(P)/ssae/$(1)-t{tilt} > /dev/null,$(P)/ssae/$(1))
endef
$(foreach r,$(RECIPES),$(eval $(call ssae_rule,$(r))))

$(P)/eval/physics/metrics.json $(P)/eval/mmlu/metrics.json: $(P)/eval/%/metrics.json: $(P)/gsae/cfg.json $(SSAES)
	$(call logged,ssae-eval $(P)/gsae $(dir $(SSAES)) --baseline $(P)/gsae --docs $(if $(filter physics,$*),$(TEST),$(OOD_TEST)) --max-tokens $(EVAL_TOKENS) --device $(DEVICE) --force -o $(@D) > /dev/null,$(@D))

# L0 sweep for the Pareto curves: GSAEs at several k (one ssae-fit), each with its SSAE (dense+TracIn text,
# t = 500; one call each: every k has its own parent)
$(foreach k,$(K_SWEEP),$(P)/sweep/gsae-k$(k)/cfg.json) &: $(P)/general.h5
	$(call logged,ssae-fit $< $(FIT_ARGS) --k $(call commas,$(K_SWEEP)) --train-tokens $(GSAE_TOKENS) --device $(DEVICE) --force -o $(P)/sweep/gsae-k{k} > /dev/null,$(P)/sweep/gsae)

define sweep_rule
$(P)/sweep/ssae-k$(1)/cfg.json: $(P)/acts/dense_tracin.h5 $(P)/sweep/gsae-k$(1)/cfg.json
	$$(call logged,ssae-fit $$< --init $(P)/sweep/gsae-k$(1) --tilt 500 --train-tokens $(SSAE_TOKENS) --lr 3e-4 --batch-size $(BATCH_SIZE) --seed 0 --device $(DEVICE) --force -o $$(@D) > /dev/null,$$(@D))
endef
$(foreach k,$(K_SWEEP),$(eval $(call sweep_rule,$(k))))

$(P)/eval/pareto/metrics.json: $(SWEEP) $(P)/gsae/cfg.json $(P)/ssae/dense_tracin-t500/cfg.json
	$(call logged,ssae-eval $(dir $(SWEEP)) $(P)/gsae $(P)/ssae/dense_tracin-t500 --baseline $(P)/gsae --docs $(TEST) --max-tokens $(EVAL_TOKENS) --device $(DEVICE) --force -o $(@D) > /dev/null,$(@D))

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
SHIFT_SSAE_TOKENS ?= $(SSAE_TOKENS)
SHIFT_SEEDS ?= 5
SHIFT_ARGS ?= --mask-professions --probe l2 $(SHIFT_BIOS_ARGS) --auto-min-drop 0 --seeds $(SHIFT_SEEDS)
SHIFT_SSAES := $(P)/ssae/medical-erm/cfg.json $(P)/ssae/medical-$(SHIFT_TERM)/cfg.json

$(P)/docs/medical.jsonl:
	mkdir -p $(@D)
	$(call logged,ssae-retrieve $(MED_SEEDS) --corpus $(CORPUS) --method bm25 --top-k $(SUB_DOCS) --exclude $(BIOS) --force -o $@ > /dev/null,$@)

$(P)/ssae/medical-%/cfg.json: $(P)/acts/medical.h5 $(P)/gsae/cfg.json
	$(call logged,ssae-fit $< --init $(P)/gsae $(call tilt_flags,$*) --train-tokens $(SHIFT_SSAE_TOKENS) --lr 3e-4 --batch-size $(BATCH_SIZE) --seed 0 --device $(DEVICE) --force -o $(@D) > /dev/null,$(@D))

$(P)/shift/shift.json: $(P)/gsae/cfg.json $(SHIFT_SSAES)
	mkdir -p $(@D)
	$(call logged,ssae-shift --data $(BIOS) --professions $(SHIFT_PROFESSIONS) --sae gsae=$(P)/gsae --sae ssae-erm=$(P)/ssae/medical-erm --sae ssae-term=$(P)/ssae/medical-$(SHIFT_TERM) --ablate auto $(SHIFT_ARGS) --device $(DEVICE) --force -o $@ > /dev/null,$@)
# ---- SHIFT (Table 1): end ---------------------------------------------------------------------------

# ---- TERM tilt sweep: `make -C shell paper-tilt` ----------------------------------------------------
# The same GSAE (TILT_GSAE) finetuned on the same subdomain text (TILT_RECIPE's activations) with the same
# budget, by ERM and by every TERM setting.  Per seed, two ssae-evals on the held-out TEST text: on its
# activations (TILT_TAIL_TOKENS; cheap, so enough tokens for the rarest-decile error and tail coverage) and
# on its documents (TILT_EVAL_TOKENS; the spliced perplexity costs a forward pass per SAE); the tables.
# A setting is a folder name: erm, t<T> (--tilt T), ess<F> (--tilt-ess F), type-t<T> / type-ess<F> (the
# same with --tilt-groups token).  Quick CPU size, e.g.:
#   make -C shell paper-tilt TILT_GSAE=path/to/gsae TILT_TOKENS=100000 TILT_EVAL_TOKENS=10000 TILT_SEEDS=0
TILT_GSAE ?= $(P)/gsae
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
TILT_DEPS := $(P)/acts/$(TILT_RECIPE).h5 $(TILT_GSAE)/cfg.json
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
