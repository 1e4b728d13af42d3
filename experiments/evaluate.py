"""Edit a model fact after fact (or batch after batch) and measure what editing costs.

    python experiments/evaluate.py --alg_name R-ROME --sequential --dataset_size_limit 20 \\
        --downstream_eval_steps 10 --data_dir ../shared/data --corpus ../shared/data/wiki

Modes: batched (default: batches of --num_edits, each applied to the original model), sequential
(--sequential, one edit at a time, cumulative) and sequential-batched (--sequential with
--num_edits B > 1). Results stream to results/<ALG>/run_NNN/ (see experiments/pipeline/run.py);
continue an interrupted run with --continue_from_run run_NNN (the stored options are reused; see
experiments/pipeline/resume.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any, Sequence

from data.cases import DATASETS
from data.probes import PROBE_TASKS
from editors import ALGORITHMS
from experiments import derive_hparams
from experiments.metrics.protocols import PROTOCOLS, protocol
from experiments.pipeline.resume import continued_options
from experiments.pipeline.run import run
from experiments.pipeline.run_config import HealthThresholds, RunOptions
from experiments.reporting.summary import markdown_table
from util.cli import run_cli
from util.environment import Environment
from util.errors import RunError
from util.models import DTYPES

DEFAULTS = RunOptions()
HEALTH = HealthThresholds()
HEALTH_FLAGS = ("entropy_ratio", "norm_jump")  # HealthThresholds fields set by flags of the same name


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line through run_cli instead of usage + message
        raise RunError(f"{message} (see --help)")


def build_parser() -> Parser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to edit")
    what.add_argument("--alg_name", default=DEFAULTS.alg_name, help=", ".join(ALGORITHMS))
    what.add_argument("--model_name", default=DEFAULTS.model_name, help="embedded name, local folder or HF id")
    what.add_argument("--hparams_fname", "--hparams", default=None,
                      help="file in hparams/<ALG>/ or a path (default: <model name, / as _>.yaml); 'auto': that file, "
                           "else derived from the model's shape and written there (experiments/derive_hparams.py)")
    what.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override one hparam (repeatable)")
    what.add_argument("--ds_name", default=DEFAULTS.ds_name, help=", ".join(DATASETS))
    what.add_argument("--custom_path", default=None, help="YAML/JSON list of requests for --ds_name custom")
    what.add_argument("--dataset_size_limit", type=int, default=DEFAULTS.dataset_size_limit, help="number of facts to edit")
    what.add_argument("--num_edits", type=int, default=DEFAULTS.num_edits, help="batch size B")
    what.add_argument("--sequential", action="store_true", help="apply batches cumulatively")
    evals = p.add_argument_group("what to measure")
    evals.add_argument("--protocol", default=DEFAULTS.protocol,
                       help=f"how the numbers are defined: {', '.join(PROTOCOLS)} (its defaults apply to the flags not given; see README)")
    evals.add_argument("--downstream_eval_steps", type=int, default=DEFAULTS.downstream_eval_steps,
                       help="K: retention, probes, perplexity and a checkpoint every K edits (0: only before and at the end)")
    evals.add_argument("--downstream_tasks", default=",".join(DEFAULTS.downstream_tasks),
                       help=f"comma-separated: {','.join(PROBE_TASKS)} ('none' for no probes)")
    evals.add_argument("--number_of_few_shots", type=int, default=DEFAULTS.number_of_few_shots)
    evals.add_argument("--number_of_tests", type=int, default=DEFAULTS.number_of_tests, help="test items per probe task (seeded sample)")
    evals.add_argument("--generation_test_interval", type=int, default=DEFAULTS.generation_test_interval,
                       help="G: generation fluency/consistency every G edits (0: never)")
    evals.add_argument("--skip_generation_tests", action="store_true", help="same as --generation_test_interval 0")
    evals.add_argument("--generation_prompts", type=int, default=DEFAULTS.generation_prompts,
                       help="prompts per generation test, from the latest edited facts backwards")
    evals.add_argument("--generation_tokens", type=int, default=DEFAULTS.generation_tokens)
    evals.add_argument("--retention_sample", type=int, default=DEFAULTS.retention_sample, metavar="N",
                       help="sequential runs: retention over a seeded sample of N of the run's facts (each scored at every "
                            "evaluation once edited) plus the latest batch; 0: every fact edited so far")
    evals.add_argument("--retention_all_at_end", action="store_true", help="the last evaluation scores every edited fact")
    evals.add_argument("--known_facts", type=int, default=DEFAULTS.known_facts, metavar="N",
                       help="known-facts probe: at most N facts the unedited model completes, none about an edited subject (0: off)")
    evals.add_argument("--final_generation_sample", type=int, default=DEFAULTS.final_generation_sample, metavar="N",
                       help="protocols that generate from every edited fact at the end (alphaedit): a seeded sample of N of "
                            "them instead (0: all; ~10 prompts of 100 tokens each, hours on a CPU at 2,000 facts); a run "
                            "continued before its end may set it")
    evals.add_argument("--perplexity_tokens", type=int, default=DEFAULTS.perplexity_tokens, help="WikiText-2 test tokens scored")
    evals.add_argument("--entropy_ratio", type=float, default=HEALTH.entropy_ratio,
                       help="disabling edit: fluency below this fraction of the pre-edit fluency")
    evals.add_argument("--norm_jump", type=float, default=HEALTH.norm_jump,
                       help="disabling edit: ||Delta|| above this multiple of the median earlier ||Delta||")
    evals.add_argument("--stop_on_collapse", action="store_true", help="end the run cleanly after a disabling edit")
    evals.add_argument("--stop_on_perplexity", type=float, default=DEFAULTS.stop_on_perplexity, metavar="RATIO",
                       help="end the run (status collapsed) at the first evaluation whose perplexity is RATIO x the pre-edit one (0: never)")
    where = p.add_argument_group("where and how")
    where.add_argument("--seed", type=int, default=DEFAULTS.seed)
    where.add_argument("--data_dir", default=None, help="reference data folder (else $KEDIT_DATA_DIR, data/downloads, download)")
    where.add_argument("--corpus", default=None, help="statistics and TF-IDF corpus (else $KEDIT_CORPUS, Wikipedia online, model-sampled text)")
    where.add_argument("--results_dir", default=DEFAULTS.results_dir)
    where.add_argument("--continue_from_run", default=None, metavar="run_NNN", help="continue this run from its last checkpoint")
    where.add_argument("--stop_after", type=int, default=None, metavar="N", help="end this session after N more edits (checkpointed)")
    where.add_argument("--save_model", action="store_true",
                       help="at the end, write the edited model to run_NNN/model_<edits> (a Hugging Face folder; see experiments/export.py)")
    where.add_argument("--device", default=DEFAULTS.device, help="cpu, cuda or auto")
    where.add_argument("--dtype", default=DEFAULTS.dtype, help=", ".join(DTYPES))
    where.add_argument("--value_dtype", default=DEFAULTS.value_dtype,
                       help="bfloat16: value optimisation in mixed precision (~3x faster on CPUs with avx512_bf16; values close to float32's)")
    where.add_argument("--max_gpu_memory", type=float, default=None, metavar="GiB",
                       help="device memory an edit may hold, weights included: sets the key/value chunk sizes and the statistics batch (util/memory.py)")
    where.add_argument("--value_cache", action="store_true",
                       help="reuse target values optimised before on the same model weights, request, templates and value hparams "
                            "($KEDIT_CACHE/values; equal to recomputed ones up to float rounding): a batched run's batch sizes share them")
    where.add_argument("--value_compile", action="store_true",
                       help="on Llama models: torch.compile the replayed layers (~1 min in the first edits, then faster steps: 14-16%% in float32 on an AVX2 CPU)")
    return p


def task_list(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    return () if names in ((), ("none",)) else names


def option_fields(flags: dict[str, Any]) -> dict[str, Any]:
    """RunOptions fields from parsed flags (argparse destinations): all of them, or only those
    given on the command line, which then name the fields they set."""
    values = dict(flags)
    health = {name: values.pop(name) for name in HEALTH_FLAGS if name in values}
    if health:
        values["health"] = HealthThresholds(**health)
    if values.pop("skip_generation_tests", False):
        values["generation_test_interval"] = 0
    if "downstream_tasks" in values:
        values["downstream_tasks"] = task_list(values["downstream_tasks"])
    if "overrides" in values:
        values["overrides"] = tuple(values["overrides"])
    for name in ("custom_path", "corpus", "data_dir"):  # absolute, so a run continues from any folder
        if values.get(name):
            values[name] = os.path.abspath(os.path.expanduser(values[name]))
    return values


def given_fields(argv: Sequence[str] | None) -> set[str]:
    """The RunOptions fields set by flags given on the command line (defaults suppressed)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(option_fields(vars(parser.parse_args(argv))))


def with_protocol_defaults(options: RunOptions, given: set[str]) -> RunOptions:
    """The protocol's settings for the options not given on the command line."""
    if options.protocol not in PROTOCOLS:
        return options  # validate() names the choices
    defaults = protocol(options.protocol).option_defaults
    return dataclasses.replace(options, **{name: value for name, value in defaults.items() if name not in given})


def options_from_argv(argv: Sequence[str] | None = None, environment: Environment | None = None) -> RunOptions:
    """The run's options from the command line and the environment variables (read here, once,
    unless `environment` is given)."""
    environment = environment or Environment.read()
    options = RunOptions(**option_fields(vars(build_parser().parse_args(argv))), environment=environment)
    if options.hparams_fname == derive_hparams.AUTO:  # the derived (or existing) file, by its path
        options = dataclasses.replace(options, hparams_fname=derive_hparams.resolve(
            options.alg_name, options.hparams_fname, options.model_name, environment.caches.models))
    if options.continue_from_run:  # the run's own corpus, not today's $KEDIT_CORPUS
        options = continued_options(options, given_fields(argv))
    else:
        options = with_protocol_defaults(options, given_fields(argv))
        if options.corpus is None and environment.corpus:
            options = dataclasses.replace(options, corpus=os.path.abspath(os.path.expanduser(environment.corpus)))
    return options.validate()


def main(argv: Sequence[str] | None = None) -> int:
    # SIGTERM ends like Ctrl-C (rolled back and checkpointed): run_cli raises util.cli.Terminated
    path = run(options_from_argv(argv))
    summary = json.loads((path / "summary.json").read_text())
    print(markdown_table([summary]), end="")
    print(f"results: {path}  ({summary['status']})")
    return 0


if __name__ == "__main__":
    run_cli(main)
