"""The settings of one evaluation run, validated once; what evaluate.py's flags turn into.

Fields split in two: those that define the results (checked against the stored config when a
run is continued) and SESSION_FIELDS, which only say where and how this process runs.
"""
from __future__ import annotations

import dataclasses
import subprocess
from dataclasses import dataclass, field
from typing import Any

from data.cases import dataset_for
from data.probes import FEW_SHOT_POOL, PROBE_TASKS
from editors import algorithm, model_hparams_file
from experiments.metrics.protocols import PROTOCOLS
from util.environment import Environment
from util.errors import RunError
from util.paths import PROJECT_ROOT

MODES = ("batched", "sequential", "sequential-batched")
# Fields that define only the last evaluation: a continued run that has not ended may change them.
FINAL_FIELDS = ("final_generation_sample",)
SESSION_FIELDS = ("continue_from_run", "results_dir", "device", "data_dir", "stop_after", "save_model", "environment",
                  "max_gpu_memory")

# What runs stored before these fields existed did: every edited fact scored, no known-facts probe.
OLD_RUN_DEFAULTS = {"retention_sample": 0, "retention_all_at_end": False, "known_facts": 0, "stop_on_perplexity": 0.0}


@dataclass(frozen=True)
class HealthThresholds:
    """When an edit counts as "disabling" (it broke the model rather than changed a fact).

    entropy_ratio: generation fluency (n-gram entropy) below this fraction of the fluency measured
      before the first edit; norm_jump: the batch's ||Delta|| above this multiple of the median
      ||Delta|| of the earlier batches (needs min_history of them)."""

    entropy_ratio: float = 0.5
    norm_jump: float = 10.0
    min_history: int = 3


@dataclass(frozen=True)
class RunOptions:
    alg_name: str = "R-ROME"
    model_name: str = "smollm2-135m"
    hparams_fname: str | None = None  # None: <model name with / as _>.yaml
    ds_name: str = "cf"
    custom_path: str | None = None
    dataset_size_limit: int = 20
    num_edits: int = 1  # batch size B
    sequential: bool = False
    downstream_eval_steps: int = 10  # K: retention, probes, perplexity and checkpoints every K edits
    downstream_tasks: tuple[str, ...] = ("sst2", "mrpc", "cola", "rte")
    number_of_few_shots: int = 3
    number_of_tests: int = 50
    generation_test_interval: int = 10  # G; 0 disables generation tests
    generation_prompts: int = 8  # prompts per generation test, from the latest edited facts backwards
    generation_tokens: int = 40
    perplexity_tokens: int = 4096
    # Retention in sequential runs: a seeded sample of this many of the run's facts, each scored at
    # every evaluation point once it is edited, plus the latest batch (0: every fact edited so far),
    # so that an evaluation point costs the same after 100 and after 10,000 edits
    retention_sample: int = 200
    retention_all_at_end: bool = False  # the last evaluation scores every edited fact
    known_facts: int = 500  # known-facts probe: at most this many facts the unedited model completes (0: off)
    # Under a protocol that generates from every edited fact at the end (alphaedit): a seeded sample of
    # this many of them (0: all). It defines the last evaluation only, so a run continued before its
    # end may set it anew (FINAL_FIELDS); its generation record says what was scored.
    final_generation_sample: int = 0
    seed: int = 0
    corpus: str | None = None
    overrides: tuple[str, ...] = ()  # --set key=value for the hparams
    stop_on_collapse: bool = False
    stop_on_perplexity: float = 0.0  # end the run at an evaluation whose perplexity is this multiple of the pre-edit one (0: never)
    dtype: str = "float32"
    value_dtype: str = "float32"  # "bfloat16": mixed-precision value optimisation (rome/compute_v.py)
    value_compile: bool = False  # torch.compile the replayed Llama layers (plain Llama models; other architectures replay modules)
    # reuse target values optimised before on the same weights, request, templates and value hparams
    # (rome/value_cache.py): the batches of a batched study share them across batch sizes
    value_cache: bool = False
    protocol: str = "kedit"  # how the numbers are defined (experiments/metrics/protocols.py)
    health: HealthThresholds = field(default_factory=HealthThresholds)
    # session fields
    continue_from_run: str | None = None
    results_dir: str = "results"
    device: str = "cpu"
    data_dir: str | None = None
    stop_after: int | None = None  # end this session cleanly (with a checkpoint) after this many edits
    save_model: bool = False  # write the edited model as a HF folder when the session ends (experiments/export.py)
    max_gpu_memory: float | None = None  # GiB an edit may hold on the device (rome.editor.EditContext)
    # the environment variables, read once by the command line (util/environment.py): the cache
    # folders (environment.caches) and more; the corpus above already holds $KEDIT_CORPUS when
    # --corpus was not given
    environment: Environment = field(default_factory=Environment)

    @property
    def mode(self) -> str:
        if not self.sequential:
            return "batched"
        return "sequential" if self.num_edits == 1 else "sequential-batched"

    @property
    def hparams_file(self) -> str:
        return self.hparams_fname or model_hparams_file(self.model_name)

    def validate(self) -> "RunOptions":
        algorithm(self.alg_name)  # one-line error naming the known algorithms
        dataset_for(self.ds_name)
        positive = ("dataset_size_limit", "num_edits", "number_of_tests", "generation_prompts",
                    "generation_tokens", "perplexity_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise RunError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("downstream_eval_steps", "generation_test_interval", "number_of_few_shots", "retention_sample", "known_facts",
                     "final_generation_sample"):
            if getattr(self, name) < 0:
                raise RunError(f"--{name} must not be negative, got {getattr(self, name)}")
        if self.number_of_few_shots > FEW_SHOT_POOL:
            raise RunError(f"--number_of_few_shots {self.number_of_few_shots}: the few-shot pool holds {FEW_SHOT_POOL}")
        unknown = [t for t in self.downstream_tasks if t not in PROBE_TASKS]
        if unknown:
            raise RunError(f"--downstream_tasks: unknown task(s) {', '.join(unknown)}; choose from {', '.join(PROBE_TASKS)} (or 'none')")
        if (self.ds_name == "custom") != (self.custom_path is not None):
            raise RunError("--custom_path goes with --ds_name custom, and --ds_name custom needs --custom_path")
        if self.value_dtype not in ("float32", "bfloat16", "float16"):
            raise RunError(f"--value_dtype must be float32, bfloat16 or float16, got {self.value_dtype!r}")
        if self.save_model and not self.sequential:
            raise RunError("--save_model needs --sequential: a batched run undoes every batch, leaving no edited model")
        if self.protocol not in PROTOCOLS:
            raise RunError(f"--protocol {self.protocol!r}: choose from {', '.join(PROTOCOLS)}")
        if self.max_gpu_memory is not None and not self.max_gpu_memory > 0:
            raise RunError(f"--max_gpu_memory must be a positive number of GiB, got {self.max_gpu_memory}")
        if not (self.stop_on_perplexity == 0 or self.stop_on_perplexity > 1):
            raise RunError(f"--stop_on_perplexity must be 0 (never) or a ratio above 1, got {self.stop_on_perplexity}")
        if self.stop_after is not None and self.stop_after < 1:
            raise RunError(f"--stop_after must be at least 1, got {self.stop_after}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunOptions":
        values = dict(values)
        for name, before in OLD_RUN_DEFAULTS.items():  # a run from before the field existed keeps what it did
            values.setdefault(name, before)
        values["health"] = HealthThresholds(**values.get("health", {}))
        values["environment"] = Environment.from_dict(values.get("environment"))
        for name in ("downstream_tasks", "overrides"):
            values[name] = tuple(values.get(name, ()))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def differences(self, stored: "RunOptions") -> list[str]:
        """Result-defining fields where self differs from a stored run's options."""
        return [
            f.name for f in dataclasses.fields(self)
            if f.name not in SESSION_FIELDS + FINAL_FIELDS and getattr(self, f.name) != getattr(stored, f.name)
        ]


def git_commit(fallback: str | None = None) -> str:
    """HEAD of the project's repository, else `fallback` ($KEDIT_GIT_SHA, e.g. in a container
    without .git), else "unknown"."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return fallback or "unknown"
