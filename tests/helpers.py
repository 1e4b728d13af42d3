"""Shared test helpers: hparams for tiny models and small corpora."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from editors import ALGORITHMS
from rome.editor import EditContext, Solver, plan_edit
from rome.values.layout import build_batch
from rome.hparams import EditHyperParams, ROMEHyperParams
from util.environment import Environment
from util.hparams import build_hparams
from util.memory import GIB, HEADROOM
from util.models import LoadedModel
from util.requests import EditRequest
from util.paths import Caches

TINY_COMMON = dict(
    fact_token="subject_last", v_num_grad_steps=8, v_lr=0.5, v_loss_layer=3, v_weight_decay=0.5,
    clamp_norm_factor=4.0, kl_factor=0.0625, context_template_length_params=[[5, 3]],
    mom2_adjustment=True, mom2_n_samples=8, mom2_sample_tokens=64, mom2_update_weight=1.0,
)

# Per editor: hparams on top of tiny_hparams' (two layers where the editor spreads).
EXTRA = {
    "ROME": dict(original_implementation=True),
    "R-ROME": dict(),
    "MEMIT": dict(layers=[1, 2], mom2_update_weight=50.0),
    "EMMET": dict(layers=[1, 2], mom2_update_weight=10.0, emmet_lambda=0.1),
    "AlphaEdit": dict(layers=[1, 2], nullspace_threshold=1e-3, L2=1e-4),
    "ENCORE": dict(layers=[1, 2], mom2_update_weight=10.0, update_norm_lambda=0.01),
    "PRUNE": dict(layers=[1, 2], mom2_update_weight=50.0),
    "RECT": dict(layers=[1, 2], mom2_update_weight=50.0),
}

# The closed-form editors (a Solver in their declaration), as the tests of solves and memory plans take them.
SOLVING = sorted(name for name, editor in ALGORITHMS.items() if editor.solver is not None)

# The editors whose solver keeps m x m matrices across edits: (constraint, remember_keys) as their
# apply functions pass them to rome.editor.edit_layers (for budgets that place those matrices).
KEPT = ("AlphaEdit", "EMMET", "ENCORE", "MEMIT")  # editors whose solver keeps m x m matrices per layer


def tiny_hparams(cls=ROMEHyperParams, **overrides) -> EditHyperParams:
    values = {**TINY_COMMON, "layers": [1], **overrides}
    return build_hparams(cls, values, "tiny test hparams")


def write_corpus(folder: Path) -> Path:
    """A small JSONL corpus with varied words, so that key statistics are well conditioned."""
    words = ("river valley mountain city king queen music football language France Paris Rome "
             "science history painter company engine village poem winter summer bridge").split()
    lines = []
    for i in range(120):
        text = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(60)) + f". Number {i}."
        lines.append(json.dumps({"text": text}))
    path = folder / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def context(tmp_path: Path, **kw) -> EditContext:
    """An EditContext whose key statistics come from the small corpus written to tmp_path, its
    caches under tmp_path/cache."""
    from tests.conftest import MODEL_CACHE

    return EditContext(Caches(tmp_path / "cache", MODEL_CACHE), corpus_path=str(write_corpus(tmp_path)), **{"seed": 0, **kw})


def float64_context(lm: LoadedModel, tmp_path: Path, **kw) -> EditContext:
    """`context` for a float64 model. Gemma 2's eager attention softmaxes in float32: in a float64
    model the mask's float64 minimum becomes -inf, and a row of left padding (the fast replay's
    alignment) turns NaN (transformers 5.23); its float64 values take the straightforward path,
    which pads on the right (float32 and bfloat16 are unaffected and test the fast path)."""
    return context(tmp_path, fast=lm.model.config.model_type != "gemma2", **kw)


def rel(a, b) -> float:
    """||a - b|| / ||b||."""
    return ((a - b).norm() / b.norm()).item()


REQUESTS = [
    {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football", "case_id": 1},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English", "case_id": 2},
    {"prompt": "{} is located in the city of", "subject": "Eiffel Tower", "target_new": "Rome", "case_id": 3},
]

# Targets of one to six tokens and prompts of several lengths (the fine-tuning and UltraEdit losses
# read every target token; UltraEdit sorts requests by length).
MULTI_TOKEN = [
    {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "ice hockey", "case_id": 1},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "Ancient Greek", "case_id": 2},
    {"prompt": "{} is located in the city of", "subject": "Eiffel Tower", "target_new": "Rome", "case_id": 3},
    {"prompt": "The capital of {} is", "subject": "France", "target_new": "Kuala Lumpur", "case_id": 4},
]


PROBE_WORDS = "good bad film great awful fine plot actor".split()


def write_run_data(folder: Path) -> Path:
    """folder/data for a small run: an sst2 probe file and a WikiText-2 test file."""
    data = folder / "data"
    (data / "glue").mkdir(parents=True)
    (data / "wiki").mkdir()
    items = [{"sentence": " ".join(PROBE_WORDS[(i + j) % 8] for j in range(6)), "label": i % 2} for i in range(16)]
    (data / "glue" / "sst2.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    (data / "wiki" / "wikitext-2-raw-test.txt").write_text(" = Valkyria = \n" + "The river flows through the old city . " * 100)
    return data


def run_options(folder: Path) -> "RunOptions":
    """Options of a small evaluate run on the tiny Llama: 5 demo edits, one probe task, data and
    corpus written under `folder`, results in folder/results; the environment read now, as a
    command line would (its caches: the test's, tests/conftest.py)."""
    from experiments.pipeline.run_config import RunOptions
    from util.paths import PROJECT_ROOT

    data = write_run_data(folder)
    return RunOptions(
        model_name="tiny-llama", ds_name="custom", custom_path=str(PROJECT_ROOT / "data" / "demo_edits.yaml"),
        dataset_size_limit=5, sequential=True, downstream_eval_steps=2, downstream_tasks=("sst2",),
        number_of_few_shots=2, number_of_tests=4, generation_test_interval=2, generation_prompts=2, generation_tokens=6,
        perplexity_tokens=96, corpus=str(write_corpus(folder)), data_dir=str(data), results_dir=str(folder / "results"),
        environment=Environment.read(),
    )


def layout(lm: LoadedModel, ctx: EditContext, hp: EditHyperParams, requests: list[EditRequest]):
    """The value optimisation's batch layout of `requests` (rome/values/layout.py), as an edit builds it."""
    return build_batch(lm, requests, ctx.templates(lm, hp), hp)


def through_checkpoint(state: dict, folder: Path, weights: dict | None = None) -> dict:
    """EditContext.state written by the run pipeline's checkpoint (Session.checkpoint's split, RunFolder's
    files) and read back as a continued run reads it (verified, loaded, experiments/pipeline/resume.py's join)."""
    from experiments.pipeline.checkpoint import Checkpoint, RunFolder
    from experiments.pipeline.session import context_state, split_context_state

    run = RunFolder.create(folder / "checkpointed", "state")
    try:
        tensors, values = split_context_state(state)
        run.save_checkpoint(Checkpoint(1, 1, {}, weights or {}, tensors, {"status": "paused", "context_values": values}))
        return context_state(run.load_checkpoint(run.verify()))
    finally:
        run.close()


def host_budget(lm: LoadedModel, ctx: EditContext, hp: EditHyperParams, requests: list[EditRequest], solver: Solver) -> float:
    """GiB of max_gpu_memory that holds an edit of `requests` (float32 values) with the solver's kept
    matrices in host memory but not with them on the device (two or more edited layers)."""
    estimate = replace(plan_edit(lm, layout(lm, ctx, hp, requests), hp, "float32", 1.0, solver.matrices(hp)), host=True)
    return (estimate.resident + max(estimate.phases()) + 64) / HEADROOM / GIB


def failing_after(apply):
    """failing_at(call, error): experiments.pipeline.run.apply_edits that raises `error` at its
    `call`-th call, after `apply` has edited (the weights are already changed when it fails)."""
    def failing_at(call: int, error: type[BaseException]):
        calls = []

        def failing(session, records):
            result = apply(session, records)
            calls.append(1)
            if len(calls) == call:
                raise error()
            return result
        return failing
    return failing_at
