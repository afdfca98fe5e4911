# minibert: one target per thing to do. Every target sets up what it needs first.
#   make baseline            the paper's experiment 2 (EPOCHS=, MODEL=, SEED=, DEVICE= override)
#   make test                the test suite

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= 2.13.0
MODEL  ?= auto
EPOCHS ?= 10
SEED   ?= 0
DEVICE ?= auto
FLAGS  ?=

.PHONY: install weights compact-weights data walkthrough test reference

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==$(TORCH)
	$(PY) -m pip install -e '.[test]'
	touch $@

weights: install
	$(PY) -m minibert weights $(MODEL)

# An fp16 copy of the model folder in weights/<model>-fp16, for a machine without internet.
compact-weights: install
	test -f weights/$(MODEL)-fp16/model.safetensors || $(PY) -m minibert weights $(MODEL) --compact weights/$(MODEL)-fp16

data: install
	$(PY) -m minibert data

# One baseline training step on one sentence, printed file by file (SENTENCE= to change it).
SENTENCE ?= wake me up at seven
walkthrough: install
	$(PY) -m minibert weights all-MiniLM-L6-v2
	$(PY) -m minibert walkthrough '$(subst ','\'',$(SENTENCE))'

# The training tests run twice: as this machine's CPU, then as the other kind (tests/cpu), whose
# default precision differs: bf16 where the CPU runs it natively (AVX512-BF16, AMX), fp32 elsewhere.
OTHER_CPU_TESTS := tests/test_train.py tests/test_levers.py tests/test_planted_bugs_net.py
test: install
	$(PY) -m minibert weights all-MiniLM-L6-v2
	$(PY) -m minibert data || echo "MASSIVE not in place: the tests that need it are skipped"
	$(PY) -m pytest
	$(PY) -m pytest --cpu other $(OTHER_CPU_TESTS)

reference: install
	$(PY) -m pip install -e '.[reference]'
	$(PY) -m minibert weights all-MiniLM-L6-v2
	$(PY) tests/make_reference.py

# ---- the paper's experiments ------------------------------------------------------------------
# Each target trains one preset of minibert/experiments.py and leaves runs/<experiment>-<model>-s<seed>/.
# A finished run is reused; an interrupted one resumes from its last epoch.
# FLAGS: more train.py flags for every run, e.g. FLAGS=--no-fast (a GPU's eager loop) or FLAGS=--bucket.
RUN = $(PY) train.py --model $(MODEL) --epochs $(EPOCHS) --seed $(SEED) --device $(DEVICE) --resume $(FLAGS)
# The presets of minibert/experiments.py, in its order (a test holds the two lists equal).
EXPERIMENTS := baseline scheduler swa both lora20 lora30 supcon simclr simclr-swa-cosine supcon-swa-cosine \
	search best lora20-tuned lora30-tuned

.PHONY: zeroshot $(EXPERIMENTS) paper best-seeds lora-seeds variant-seeds bucketing precision readme-results tune bench profile bench-gpu
zeroshot: install data
	$(PY) evaluate.py --zero-shot --model $(MODEL) --seed $(SEED)

$(EXPERIMENTS): install data
	$(RUN) --experiment $@

# Every experiment for SEEDS seeds (seed 0 of every row first), JOBS runs side by side, then
# results/paper/<model>-e<epochs>/report.md and figures. Finished runs are kept; interrupted
# ones resume. The records (results.json, metrics.jsonl) are meant to be committed.
SEEDS ?= 3
JOBS  ?= 2
PAPER_DIR = results/paper/$(MODEL)-e$(EPOCHS)
# FLAGS reaches every run; a target's own flags come after it: $(call flags,--bucket). Single-quoted
# for the shell, so that FLAGS may hold double quotes (a file name with spaces).
flags = --flags='$(subst ','\'',$(strip $(FLAGS) $(1)))'
SEEDS_RUN = $(PY) -m lab.paper --model $(MODEL) --epochs $(EPOCHS) --seeds $(SEEDS) --device $(DEVICE) --jobs $(JOBS)
paper: install data
	$(SEEDS_RUN) $(PAPER_DIR) $(call flags)

# `best` for SEEDS seeds.
best-seeds: install data
	$(SEEDS_RUN) results/best/$(MODEL)-e$(EPOCHS) --rows best $(call flags)
# LoRA tuned on dev (lora20-tuned, lora30-tuned) for SEEDS seeds, beside the paper's LoRA rows.
lora-seeds: install data
	$(SEEDS_RUN) results/lora-tuned/$(MODEL)-e$(EPOCHS) --rows lora20-tuned lora30-tuned $(call flags)
# The contrastive rows with SWA and cosine decay (the variant the paper's first author describes for
# its SimCLR row) for SEEDS seeds, beside the paper's contrastive rows.
variant-seeds: install data
	$(SEEDS_RUN) results/authors/$(MODEL)-e$(EPOCHS) --rows simclr-swa-cosine supcon-swa-cosine $(call flags)
# The bucketing question: baseline and best with batching flipped (baseline bucketed, best not),
# then both arms of each, dev and test, against the paper's baseline and best-seeds' runs.
BUCKETING = results/bucketing/$(MODEL)-e$(EPOCHS)
bucketing: install data
	$(SEEDS_RUN) $(BUCKETING)-bucketed --rows baseline $(call flags,--bucket)
	$(SEEDS_RUN) $(BUCKETING)-unbucketed --rows best $(call flags,--no-bucket)
	$(PY) -m lab.report $(PAPER_DIR) results/best/$(MODEL)-e$(EPOCHS) $(BUCKETING)-bucketed \
		$(BUCKETING)-unbucketed --by bucket --out $(BUCKETING).md

# Does bf16 autocast move accuracy? baseline and best, SEEDS seeds, 2 epochs, in fp32 and bf16
# (worth running where the CPU or GPU runs bf16 natively; elsewhere bf16 is emulated and slow).
precision: install data
	for p in fp32 bf16; do $(SEEDS_RUN) results/precision/$(MODEL)-e2-$$p --epochs 2 \
		--rows baseline best $(call flags)" --precision=$$p" || exit 1; done
	$(PY) -m lab.report results/precision/$(MODEL)-e2-fp32 results/precision/$(MODEL)-e2-bf16 --by precision \
		--out results/precision/$(MODEL)-e2.md --readme README.md

# The README's results section, regenerated from the committed records.
readme-results: install
	$(PY) -m lab.report results/paper/all-MiniLM-L6-v2-e10 --readme README.md

# Choose the `best` preset on the dev split alone (the test split is never evaluated): every
# lever alone on BASE at TUNE_EPOCHS, or CANDIDATES="base swa supervise-both+swa" (levers joined by +).
BASE        ?= search
TUNE_EPOCHS ?= 3
CANDIDATES  ?=
tune: install data
	$(PY) -m lab.tune results/tune/$(MODEL)-$(BASE)-e$(TUNE_EPOCHS) --base $(BASE) --model $(MODEL) \
		--epochs $(TUNE_EPOCHS) --device $(DEVICE) --jobs $(JOBS) $(call flags) \
		$(if $(CANDIDATES),--candidates $(CANDIDATES))

# Training and evaluation speed against transformers, side by side in one process.
bench: install data
	$(PY) -m lab.speed
# Where the time of one CPU training step goes: its operators by group, beside each group's floor.
profile: install data
	$(PY) -m lab.speed --profile
# The same on a CUDA GPU: bert-base shapes, random weights; transformers compiled, peft LoRA, minibert
# eager and fast (CUDA graph, fused QKV, compiled layers), and a profile of the fast step by kernel kind.
bench-gpu: install
	$(PY) -m lab.gpu --profile
