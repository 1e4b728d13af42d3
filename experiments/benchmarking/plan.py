"""What an edit will ask of a GPU, answered without one: util/memory.py's plan for a model's shape
(built on the 'meta' device: no weights, no memory) per editor and batch size within a budget:
where the solver's kept matrices live, the chunks of requests, and the estimated peak. Run
through experiments/benchmark.py --plan, e.g.

    python experiments/benchmark.py --plan --model_name random:llama-3-8b --dtype bfloat16 \\
        --value_dtype bfloat16 --hparams Llama-3-8B.yaml --batches 1,1024 --max_gpu_memory 40

The edits are the first CounterFact records; the context templates are text of the hparams'
template lengths (sampled ones have that many tokens), so the row lengths are those of a run.
The figures are the estimate's (an upper bound by construction), not a measurement.
"""
from __future__ import annotations

from dataclasses import dataclass

from editors import ALGORITHMS, load_algorithm_hparams
from rome.editor import plan_edit
from rome.hparams import EditHyperParams
from rome.values.layout import build_batch
from util.errors import MemoryBudgetError
from util.memory import GIB
from util.models import LoadedModel
from util.requests import EditRequest

# Any English prose: template text is cut from it to the configured token counts.
FILLER = ("The history of the region begins long before the first written records, when small groups of farmers "
          "settled along the river and built villages of wood and stone. Over the centuries these villages grew into "
          "towns, the towns into cities, and the cities into a kingdom whose rulers traded with distant lands across "
          "the sea, bringing back spices, silk, books and new ideas about science, art and government.")


@dataclass(frozen=True)
class PlanRow:
    alg: str
    batch: int
    placement: str  # where the solver's kept matrices live: "device", "host" or "-" (none kept)
    key_chunk: int
    value_chunk: int
    peak_gib: float | None  # None: does not fit
    error: str = ""


def filler_templates(lm: LoadedModel, hparams: EditHyperParams) -> list[str]:
    """["{}"] and, per [length, count], `count` texts of `length` tokens ending in ". {}"."""
    ids = lm.tok(FILLER, add_special_tokens=False)["input_ids"]
    templates = ["{}"]
    for length, count in hparams.context_template_length_params:
        if length > len(ids):
            raise MemoryBudgetError(f"context templates of {length} tokens are longer than the planning text ({len(ids)} tokens)")
        templates += [lm.tok.decode(ids[:length]) + ". {}"] * count
    return templates


def plan_rows(lm: LoadedModel, requests: list[EditRequest], algs: list[str], batches: list[int], hparams_file: str,
              overrides: list[str], value_dtype: str, budget_gib: float) -> list[PlanRow]:
    """The plan of one edit of the first `batch` requests per editor and batch (ROME and R-ROME
    edit one request at a time: batch 1 only)."""
    weights = sum(t.numel() * t.element_size() for t in [*lm.model.parameters(), *lm.model.buffers()])  # on 'meta': its shapes
    rows = []
    for alg in algs:
        if ALGORITHMS[alg].solver is None:  # util/memory.py plans value optimisation and solves
            rows.append(PlanRow(alg, 0, "-", 0, 0, None, "not planned: util/memory.py plans the closed-form editors' edits"))
            continue
        hparams = load_algorithm_hparams(alg, hparams_file, overrides)
        sizes = sorted({1} if alg in ("ROME", "R-ROME") else set(batches))
        layout = build_batch(lm, requests[:sizes[-1]], filler_templates(lm, hparams), hparams)  # each batch: its first requests
        matrices = ALGORITHMS[alg].solver.matrices(hparams)
        for batch in sizes:
            plan = plan_edit(lm, layout.chunk(0, batch), hparams, value_dtype, budget_gib, matrices, weights)
            placement = "-" if not plan.kept else ("host" if plan.host else "device")
            try:
                keys, values = plan.used_chunks(batch)
            except MemoryBudgetError as err:
                rows.append(PlanRow(alg, batch, placement, 0, 0, None, f"does not fit: {err}"))
                continue
            rows.append(PlanRow(alg, batch, placement, keys, values, plan.peak(batch) / GIB))
    return rows


def plan_table(rows: list[PlanRow], budget_gib: float) -> str:
    lines = [f"| editor | batch | solver matrices | requests per key forward / value batch | estimated peak (budget {budget_gib:g} GiB) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.alg} | {r.batch or '-'} | {r.placement} | " +
                     (f"{r.error} | |" if r.error else f"{r.key_chunk} / {r.value_chunk} | {r.peak_gib:.3g} GiB |"))
    return "\n".join(lines)
