"""The algorithm registry and a small Python API for notebooks. It sits above the editor packages
it lists (none of them imports it), so util/ stays below every editor.

    from editors import edit, load
    lm = load("smollm2-135m")     # util.models.load_model, its model cache from the environment
    result = edit(lm.model, lm.tok, [{"prompt": "{} plays the sport of", "subject": "LeBron James",
                                      "target_new": "football"}], "hparams/R-ROME/smollm2-135m.yaml")
    result.deltas                 # {parameter name: change}, already applied to the model
    restore(lm.model, result.originals)   # util.deltas.restore: undo exactly
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

import alphaedit.alphaedit_main as alphaedit_main
import emmet.emmet_main as emmet_main
import encore.encore_main as encore_main
import ft.ft_main as ft_main
import ftm.ftm_main as ftm_main
import memit.memit_main as memit_main
import prune.prune_main as prune_main
import rect.rect_main as rect_main
import rome.rome_main as rome_main
import ultraedit.ultraedit_main as ultraedit_main
from rome.declaration import Editor
from rome.editor import EditContext, EditResult
from util.arch import arch_for
from util.environment import Environment
from util.errors import HparamsError
from util.hparams import load_hparams
from util.models import LoadedModel, load_model, model_name, prepare_tokenizer
from util.paths import PROJECT_ROOT
from util.requests import EditRequest, make_request

# Every editor, as its package declares it (rome/declaration.py). A new editor is its package,
# its hparams/<ALG>/*.yaml, its test and one entry here.
EDITORS: list[Editor] = [
    rome_main.ROME,
    rome_main.R_ROME,
    memit_main.EDITOR,
    emmet_main.EDITOR,
    alphaedit_main.EDITOR,
    encore_main.EDITOR,
    prune_main.EDITOR,
    rect_main.EDITOR,
    ft_main.EDITOR,
    ftm_main.EDITOR,
    ultraedit_main.EDITOR,
]
ALGORITHMS: dict[str, Editor] = {editor.name: editor for editor in EDITORS}


def algorithm(name: str) -> Editor:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise HparamsError(f"unknown algorithm '{name}'; choose from {', '.join(ALGORITHMS)}") from None


def hparams_path(alg_name: str, file_name: str) -> Path:
    """hparams/<ALG>/<file>, or the file itself when it is a path that exists."""
    direct = Path(file_name)
    if direct.is_file():
        return direct
    return PROJECT_ROOT / "hparams" / alg_name / (file_name if file_name.endswith(".yaml") else file_name + ".yaml")


def model_hparams_file(model_name: str) -> str:
    """A model's hparams file name in hparams/<ALG>/: its name with / as _ (a Hugging Face id or a folder)."""
    return model_name.strip("/").replace("/", "_") + ".yaml"


def load_algorithm_hparams(alg_name: str, file_name: str, overrides: Iterable[str] = ()) -> Any:
    """hparams/<ALG>/<file> (or a path) with `overrides`, into the algorithm's class, with the
    values the algorithm fixes (ROME's and r-ROME's original_implementation)."""
    alg = algorithm(alg_name)
    return load_hparams(alg.hparams_class, hparams_path(alg_name, file_name), overrides, alg.fixed)


def _algorithm_of(hparams: Any) -> Editor:
    for alg in EDITORS:
        if alg.takes(hparams):
            return alg
    raise HparamsError(f"no algorithm takes hparams of type {type(hparams).__name__}")


def load(name: str, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """util.models.load_model with the model cache of $KEDIT_CACHE / $KEDIT_MODEL_CACHE, read here,
    at the notebook API's edge."""
    return load_model(name, dtype, device, model_cache=Environment.read().caches.models)


def new_context(max_gpu_memory: float | None = None) -> EditContext:
    """An EditContext from the environment variables, read here, at the notebook API's edge: the
    statistics corpus from $KEDIT_CORPUS (else as util/corpus.py describes), the cache folders
    from $KEDIT_CACHE / $KEDIT_MODEL_CACHE (util/environment.py)."""
    environment = Environment.read()
    return EditContext(environment.caches, corpus_path=environment.corpus, offline=environment.offline,
                       max_gpu_memory=max_gpu_memory)


def edit(
    model: torch.nn.Module,
    tok,
    requests: list[Mapping[str, Any] | EditRequest],
    hparams: Any,
    alg_name: str | None = None,
    context: EditContext | None = None,
    name: str | None = None,
    max_gpu_memory: float | None = None,
) -> EditResult:
    """Edit `model` in place with `requests` and return the deltas applied.

    hparams: an hparams object, or a YAML path (then `alg_name` picks the class, default from the
    folder name hparams/<ALG>/...). context: reuse one across calls to keep templates and
    statistics (new_context() makes one, and the caller closes it); the default is
    new_context(max_gpu_memory), closed before returning.
    name: what statistics and templates are cached under; default util.models.model_name(model):
    the embedded name for a model loaded by it (so the command line's cache serves), else the
    name or folder it was loaded from.
    max_gpu_memory: GiB of device memory the edit may hold, weights included (chunk sizes and the
    statistics batch follow from it, util/memory.py); for the default context, a given one carries
    its own (EditContext.max_gpu_memory)."""
    if context is not None and max_gpu_memory is not None:
        raise HparamsError("edit(): give max_gpu_memory to the EditContext passed as context, not both")
    if isinstance(hparams, (str, Path)):
        path = Path(hparams)
        hparams = load_algorithm_hparams(alg_name or path.parent.name, str(path))
    prepare_tokenizer(tok)
    lm = LoadedModel(model, tok, arch_for(model), name or model_name(model))  # an embedded model: its name, as the CLI
    built = [r if isinstance(r, EditRequest) else make_request(r, f"request {i}") for i, r in enumerate(requests)]
    if context is None:
        with new_context(max_gpu_memory) as context:
            return _algorithm_of(hparams).apply(lm, built, hparams, context)
    return _algorithm_of(hparams).apply(lm, built, hparams, context)
