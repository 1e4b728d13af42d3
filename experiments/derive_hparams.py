"""Hparams for a model nobody shipped them for, derived from its shape and the papers' rules.

    python experiments/derive_hparams.py --alg_name MEMIT --model_name /path/to/model   # writes hparams/MEMIT/<model>.yaml
    python experiments/evaluate.py --alg_name MEMIT --model_name /path/to/model --hparams auto

`--hparams auto` (evaluate.py, layer_sweep.py) reads the model's file in hparams/<ALG>/ when there
is one (shipped, derived earlier, or refined since) and otherwise derives it here and writes it
there, with a header saying it was derived and from what. The rules:

- the reference: the algorithm's shipped file for the nearest family with the papers' values
  (`REFERENCES`, in order of preference: GPT-2 XL for GPT-2, GPT-J-6B for GPT-J and GPT-NeoX,
  Meta-Llama-3-8B for the pre-norm decoders; the next where an editor ships no file for the
  first, e.g. UltraEdit none for GPT-2 XL); every value below not named comes from it unchanged;
- the edited layers at the reference's relative depth: layer l of its n_ref layers becomes
  round(l n / n_ref) of the model's n, the first and last of a range each, the range kept whole
  (`layers`, and each site's layers of UltraEdit's `modules`);
- v_loss_layer: the last layer (the papers' choice in every shipped file), for the editors that
  optimise values;
- key statistics: the papers' 100,000 Wikipedia samples of 1,024 tokens are sized for GPUs and
  6,400 key dimensions; here C0 (m x m) gets TOKENS_PER_KEY_DIM tokens per key dimension m, in
  windows of STATS_WINDOW tokens or the model's context if shorter (hparams/*/smollm2-135m.yaml:
  200 x 512 for m = 1,536).
The editor is then asked what it would edit (Editor.edited_params): a site the model lacks (e.g.
UltraEdit's gate projections on Phi-3's fused gate_up) ends in one line. What the shape does not
decide stays the reference's and may need tuning on the model: above
all mom2_update_weight and nullspace_threshold, tuned to the reference's key scale (see
hparams/MEMIT/smollm2-135m.yaml for how far lambda moved on a small model); the layer is best
checked with experiments/layer_sweep.py (README, "Hparams for a new model").
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from editors import algorithm, hparams_path, load_algorithm_hparams, model_hparams_file
from util.arch import edited_weight
from util.cli import run_cli
from util.environment import Environment
from util.errors import HparamsError, KeditError
from util.hparams import build_hparams, to_dict
from util.models import LoadedModel, shape_model
from util.paths import PROJECT_ROOT

log = logging.getLogger(__name__)

AUTO = "auto"  # the --hparams value that asks for this module
HPARAMS_DIR = PROJECT_ROOT / "hparams"  # where derived files are written: hparams/<ALG>/<model>.yaml
# model_type -> reference files, nearest family first; every other family in util/arch.py's table
# is a pre-norm decoder (DEFAULT_REFERENCES)
REFERENCES = {"gpt2": ("gpt2-xl", "EleutherAI_gpt-j-6B", "Llama-3-8B"),
              "gptj": ("EleutherAI_gpt-j-6B", "gpt2-xl", "Llama-3-8B"),
              "gpt_neox": ("EleutherAI_gpt-j-6B", "gpt2-xl", "Llama-3-8B")}
DEFAULT_REFERENCES = ("Llama-3-8B", "EleutherAI_gpt-j-6B", "gpt2-xl")
REFERENCE_DEPTH = {"gpt2-xl": 48, "EleutherAI_gpt-j-6B": 28, "Llama-3-8B": 32}  # the reference models' layers
TOKENS_PER_KEY_DIM = 64
STATS_WINDOW = 512
DERIVED = "# Derived, not tuned"  # how a derived file's header begins


@dataclass(frozen=True)
class Derived:
    hparams: Any  # the algorithm's hparams class
    header: str  # YAML comment lines
    fixed: frozenset[str] = frozenset()  # keys the editor sets itself (Editor.fixed), not written

    def text(self) -> str:
        """The header and every key in the class's order but those the editor fixes, lists on one line
        as the shipped files write them."""
        values = to_dict(self.hparams)
        lines = [f"{f.name}: {json.dumps(values[f.name])}" if isinstance(values[f.name], (list, dict)) else yaml.safe_dump({f.name: values[f.name]}).strip()
                 for f in fields(self.hparams) if f.name not in self.fixed]
        return self.header + "\n".join(lines) + "\n"


def scaled_layers(layers: list[int], n_ref: int, n: int) -> list[int]:
    """The reference's edited layers at the same relative depth in a model of n layers: a range's
    first and last layer scaled (rounded half up), the range between them kept whole."""
    scale = lambda layer: min(n - 1, max(0, math.floor(layer * n / n_ref + 0.5)))  # noqa: E731
    first, last = scale(layers[0]), scale(layers[-1])
    return list(range(first, last + 1)) if len(layers) > 1 else [first]


def reference_file(alg_name: str, model_type: str) -> str:
    """The nearest family's file the algorithm ships (REFERENCES)."""
    names = REFERENCES.get(model_type, DEFAULT_REFERENCES)
    for name in names:
        if hparams_path(alg_name, name).is_file():
            return name
    raise HparamsError(f"{alg_name} ships none of the reference hparams files {', '.join(names)} in hparams/{alg_name}/ "
                       f"to derive hparams for a {model_type} model from")


def derive(alg_name: str, lm: LoadedModel) -> Derived:
    """`alg_name`'s hparams for `lm` (its shape only: a model on the 'meta' device serves)."""
    model_type, editor = lm.model.config.model_type, algorithm(alg_name)
    source = reference_file(alg_name, model_type)
    reference = load_algorithm_hparams(alg_name, source)
    n_ref, n = REFERENCE_DEPTH[source], lm.model.config.num_hidden_layers
    m = edited_weight(lm.model, lm.arch, 0).shape[1]
    window = min(STATS_WINDOW, getattr(lm.model.config, "max_position_embeddings", None) or STATS_WINDOW)  # within its context
    windows = math.ceil(TOKENS_PER_KEY_DIM * m / window)
    values, said = to_dict(reference), []
    if "layers" in values:
        values["layers"] = scaled_layers(reference.layers, n_ref, n)
        said.append(f"edited layers {_span(reference.layers)} of {n_ref} -> {_span(values['layers'])} of {n}")
    if "modules" in values:  # UltraEdit: layers per site
        values["modules"] = {site: scaled_layers(layers, n_ref, n) for site, layers in reference.modules.items()}
        said += [f"{site} layers {_span(reference.modules[site])} of {n_ref} -> {_span(layers)} of {n}"
                 for site, layers in values["modules"].items()]
    if "v_loss_layer" in values:
        values["v_loss_layer"] = n - 1
        said.append("v_loss_layer the last layer")
    if "mom2_n_samples" in values:
        values.update(mom2_n_samples=windows, mom2_sample_tokens=window)
        said.append(f"key statistics {windows} windows of {window} tokens ({TOKENS_PER_KEY_DIM} per key dimension)")
    hparams = build_hparams(editor.hparams_class, values, f"hparams derived for {lm.name}")
    try:
        editor.edited_params(lm, hparams)
    except KeditError as e:
        raise HparamsError(f"{alg_name}'s hparams cannot be derived for {lm.name} from hparams/{alg_name}/{source}.yaml: {e}") from None
    header = (
        f"{DERIVED}: experiments/derive_hparams.py for {lm.name} ({model_type}, {n} layers, d={lm.model.config.hidden_size}, m={m})\n"
        f"# from hparams/{alg_name}/{source}.yaml ({n_ref} layers), at its relative depth:\n"
        + "".join(f"# {line}\n" for line in said) +
        "# every other value the reference's (mom2_update_weight, nullspace_threshold and learning rates\n"
        "# suit its scale, not necessarily this model's).\n"
        f"# Check the layer: experiments/layer_sweep.py --alg_name {alg_name} --model_name {lm.name} --hparams auto (README).\n"
    )
    return Derived(hparams, header, frozenset(editor.fixed))


def _span(layers: list[int]) -> str:
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


def derived_file(alg_name: str, model_name: str, model_cache: Path, overwrite: bool = False) -> Path:
    """The model's hparams file in hparams/<ALG>/: the one there, else derived (from the model's
    config alone, no weights loaded) and written there; `overwrite` derives it again."""
    algorithm(alg_name)  # one line naming the known algorithms
    path = HPARAMS_DIR / alg_name / model_hparams_file(model_name)
    if path.is_file() and not overwrite:
        log.info("hparams auto: %s (%s)", path, "derived earlier" if path.read_text().startswith(DERIVED) else "shipped or written by hand")
        return path
    derived = derive(alg_name, shape_model(model_name, model_cache=model_cache))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(derived.text())
    log.info("hparams auto: derived %s", path)
    return path


def resolve(alg_name: str, hparams_fname: str | None, model_name: str, model_cache: Path) -> str | None:
    """A command line's hparams file: `auto` becomes the derived (or existing) file's path."""
    if hparams_fname != AUTO:
        return hparams_fname
    return str(derived_file(alg_name, model_name, model_cache))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alg_name", required=True)
    parser.add_argument("--model_name", required=True, help="embedded name, local folder or HF id (its config is read, not its weights)")
    parser.add_argument("--overwrite", action="store_true", help="derive again over an existing file")
    parser.add_argument("--print", dest="print_only", action="store_true", help="print the derived file instead of writing it")
    args = parser.parse_args()
    model_cache = Environment.read().caches.models
    if args.print_only:
        print(derive(args.alg_name, shape_model(args.model_name, model_cache=model_cache)).text(), end="")
        return 0
    path = HPARAMS_DIR / args.alg_name / model_hparams_file(args.model_name)
    if path.is_file() and not args.overwrite:
        raise HparamsError(f"{path} exists ({'derived earlier' if path.read_text().startswith(DERIVED) else 'not derived'}); "
                           f"--overwrite derives it again, --print shows the derived values")
    print(derived_file(args.alg_name, args.model_name, model_cache, overwrite=True))
    return 0


if __name__ == "__main__":
    run_cli(main)
