"""Faults a hostile tester found on a fresh clone (issue 29), one test each: every one ends in one
line naming the file or key, an exit code other than 0, and nothing shipped or already written
overwritten or left half-written."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from experiments import reproduce
from experiments.pipeline.checkpoint import RunFolder
from experiments.pipeline.export import EXPORT_INFO, export_run
from experiments.pipeline.run import run
from experiments.pipeline.runlock import lock_path
from tests.helpers import tiny_hparams, write_corpus
from tests.test_evaluate_run import fresh, options  # noqa: F401 (fixture)
from tests.test_run_faults import cli_error, snapshot
from tests.test_stats_share import LAYERS, SAMPLES, TOKENS, exported, model  # noqa: F401 (fixture)
from util.corpus import local_corpus
from util.errors import HparamsError, KeditError, ModelLoadError, RequestError, RunError
from util.models import load_model
from util.requests import make_request
from util.stats import StatsCache
from util.stats_share import MANIFEST, TENSORS, StatsShareError, import_stats
from util.paths import sha256_file



# 1. reproduce.py --report_only with no runs (a wrong or empty results folder) rewrote the shipped
#    docs/results_<study>.{md,png} with "(no runs)" and exit 0.
def test_report_without_runs_leaves_the_shipped_table_and_plot_as_they_are(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results_rome.md").write_text("the shipped table\n")
    (docs / "results_rome.png").write_bytes(b"the shipped plot")
    before = snapshot(docs)
    argv = ["--study", "rome", "--report_only", "--results_dir", str(tmp_path / "empty"), "--docs_dir", str(docs)]
    err = cli_error(capsys, lambda: reproduce.main(argv))
    assert "no runs of study 'rome'" in err and str(docs / "results_rome.md") in err
    assert snapshot(docs) == before


# 2. Deleting results/<ALG>/.run_NNN.lock while a run was active admitted a second writer.
def test_the_run_lock_holds_when_its_lock_file_is_deleted(tmp_path):
    folder = RunFolder.create(tmp_path, "MEMIT")
    try:
        lock_path(folder.path).unlink()  # "a stale lock"
        with pytest.raises(RunError, match=r"run_001 is in use by another process"):
            RunFolder(folder.path).lock()
        lock_path(folder.path).write_text("")  # an emptied lock file changes nothing either
        with pytest.raises(RunError, match=r"run_001 is in use by "):
            RunFolder(folder.path).lock()
    finally:
        folder.close()
    again = RunFolder(folder.path)  # released with its writer
    again.lock()
    again.close()


@pytest.fixture
def finished_run(options, tokenizer):
    """A sequential run of 3 edits on the tiny Llama, with no probes (quick)."""
    quick = dataclasses.replace(options, dataset_size_limit=3, downstream_tasks=(), generation_test_interval=0,
                                downstream_eval_steps=0)
    return quick, run(quick, fresh(tokenizer), tiny_hparams())


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def nan_weights_with_their_sha_recorded(path: Path) -> None:
    """Weights holding NaN whose size and SHA-256 the checkpoint's manifest records (as if written so)."""
    from safetensors.torch import load_file

    tensors = {name: torch.full_like(value, float("nan")) for name, value in load_file(str(path)).items()}
    save_file(tensors, str(path))
    state = path.parent / "state.json"
    data = json.loads(state.read_text())
    data["manifest"][path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    state.write_text(json.dumps(data))


# 3. export.py exported a checkpoint whose bytes were flipped (continuing refuses the same file);
#    it now checks the SHA-256, and the matrices' shapes and finiteness, before writing.
@pytest.mark.parametrize("damage, fragment", [(flip_a_byte, "differs from the checkpoint's SHA-256"),
                                              (nan_weights_with_their_sha_recorded, "holds NaN or infinite values")])
def test_export_refuses_a_damaged_checkpoint_and_writes_nothing(finished_run, tokenizer, tmp_path, damage, fragment):
    _, path = finished_run
    (weights,) = (path / "checkpoint").glob("weights_*")
    damage(weights)
    with pytest.raises(RunError) as err:
        export_run(path, tmp_path / "exported", lm=fresh(tokenizer))
    assert fragment in str(err.value) and str(weights) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "exported").exists() and not list(tmp_path.glob(".exported*"))


# 4. --save_model was not written atomically: SIGTERM left a model folder without its tokenizer or
#    kedit_export.json next to status "complete".
def test_an_interrupted_save_model_leaves_no_half_folder(options, tokenizer, monkeypatch):
    from util.cli import Terminated

    quick = dataclasses.replace(options, save_model=True, dataset_size_limit=3, downstream_tasks=(),
                                generation_test_interval=0, downstream_eval_steps=0)
    lm = fresh(tokenizer)

    def terminated(*args, **kwargs):  # SIGTERM arrives while the tokenizer is written
        raise Terminated()

    monkeypatch.setattr(lm.tok, "save_pretrained", terminated)
    with pytest.raises(Terminated):
        run(quick, lm, tiny_hparams())
    (path,) = Path(quick.results_dir).glob("R-ROME/run_*")
    assert not [p.name for p in path.iterdir() if "model_" in p.name]
    # the checkpoint is whole: the model is exported from it afterwards
    monkeypatch.undo()
    out = export_run(path, lm=fresh(tokenizer))
    assert out == path / "model_000003" and (out / EXPORT_INFO).is_file() and (out / "tokenizer.json").is_file()


def test_export_never_overwrites_a_folder_that_is_not_this_runs_export(finished_run, tokenizer, tmp_path):
    _, path = finished_run
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own files")
    with pytest.raises(RunError, match="exists and is not an exported model"):
        export_run(path, mine, lm=fresh(tokenizer))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    out = export_run(path, tmp_path / "model", lm=fresh(tokenizer))
    assert export_run(path, out, lm=fresh(tokenizer)) == out  # the same run's export: replaced whole


def tampered(folder: Path, change) -> None:
    """`change` the exported tensors, then record their SHA-256 in the manifest (as a careless hand would)."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / TENSORS))
    change(tensors)
    save_file(tensors, str(folder / TENSORS))
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["tensors_sha256"] = sha256_file(folder / TENSORS)
    (folder / MANIFEST).write_text(json.dumps(manifest))


# 5. key_stats.py --import trusted tensors whose manifest SHA was updated: a 64x64 or NaN C0 was
#    imported, and every later run failed in cholesky_solve with a traceback.
@pytest.mark.parametrize("change, fragment", [
    (lambda t: t.update({"layer.1.mom2": torch.eye(64, dtype=torch.float64)}), "tensor 'layer.1.mom2' is 64x64, expected 96x96"),
    (lambda t: t["layer.2.mom2"].fill_(float("nan")), "tensor 'layer.2.mom2' holds NaN or infinite values"),
    (lambda t: t.pop("layer.1.nullspace"), "tensor 'layer.1.nullspace' is missing"),
])
def test_import_checks_every_tensor_before_storing_any(exported, tokenizer, tmp_path, change, fragment):
    folder = exported[0]
    tampered(folder, change)
    cache = StatsCache(tmp_path / "c")
    with pytest.raises(StatsShareError) as err:
        import_stats(model(tokenizer), folder, cache)
    assert fragment in str(err.value) and str(folder / TENSORS) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "c").exists()  # nothing stored


# 6. A write error at the first checkpoint said "the previous checkpoint is intact, continue";
#    there is none, and continuing fails.
def test_a_write_error_at_the_first_checkpoint_does_not_promise_a_previous_one(options, tokenizer, monkeypatch):
    real_fsync = os.fsync

    def full_disk(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if "/checkpoint/" in name and name.endswith(".partial"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(RunError) as err:
        run(options, fresh(tokenizer), tiny_hparams())
    message = str(err.value)
    assert f"errno {errno.ENOSPC}" in message and "\n" not in message
    assert "intact" not in message and "no checkpoint of this run was written yet" in message


# 7. A truncated statistics cache file ended in a safetensors traceback that named no file.
def test_a_truncated_statistics_cache_file_is_one_line_naming_it(tiny_llama, tmp_path, caches):
    corpus = local_corpus(write_corpus(tmp_path), caches)
    StatsCache(tmp_path / "stats").second_moments(tiny_llama, [1], corpus, 4, 32, progress=False)
    (cached,) = (tmp_path / "stats").rglob("*.safetensors")
    cached.write_bytes(cached.read_bytes()[: cached.stat().st_size // 2])
    with pytest.raises(KeditError) as err:  # util.errors.CacheError
        StatsCache(tmp_path / "stats").second_moments(tiny_llama, [1], corpus, 4, 32, progress=False)
    assert str(err.value).startswith(f"{cached} cannot be read") and "delete it" in str(err.value)
    assert "\n" not in str(err.value)


# 8. A model folder without weights: a traceback (OSError); an empty folder: "not a local folder".
@pytest.mark.parametrize("contents, fragment", [({"config.json"}, "holds no weights"), (set(), "has no config.json")])
def test_a_model_folder_without_config_or_weights_is_one_line(tiny_llama, tmp_path, caches, contents, fragment):
    tiny_llama.model.save_pretrained(tmp_path / "saved")
    folder = tmp_path / "model"
    folder.mkdir()
    for name in contents:
        shutil.copy(tmp_path / "saved" / name, folder / name)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(folder), model_cache=caches.models)
    assert str(err.value).startswith(f"model folder '{folder}' {fragment}") and "\n" not in str(err.value)


def test_a_truncated_weight_file_is_one_line_naming_the_model(tiny_llama, tmp_path, caches):
    tiny_llama.model.save_pretrained(tmp_path / "model")
    (weights,) = (tmp_path / "model").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path / "model"), model_cache=caches.models)
    assert str(err.value).startswith(f"model '{tmp_path / 'model'}' ") and "cannot be loaded" in str(err.value)


# 9. A key_stats manifest missing a key, or with a layer as a string: a KeyError/TypeError traceback.
@pytest.mark.parametrize("change, fragment", [
    (lambda m: m.pop("fingerprint"), "key 'fingerprint' is missing"),
    (lambda m: m["layers"][0].update(layer="1"), "key 'layers[0].layer' must be int, got '1'"),
    (lambda m: m["layers"][1].pop("count"), "key 'layers[1].count' is missing"),
    (lambda m: m.update(n_tokens=True), "key 'n_tokens' must be int, got True"),
])
def test_a_manifest_with_a_missing_or_mistyped_key_is_one_line(exported, tokenizer, tmp_path, change, fragment):
    folder = exported[0]
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StatsShareError) as err:
        import_stats(model(tokenizer), folder, StatsCache(tmp_path / "c"))
    assert str(err.value) == f"{folder / MANIFEST}: {fragment}"


# 10. export.py --at N without a checkpoint at N listed "[]": its pattern missed the hash suffix.
def test_export_at_a_missing_checkpoint_lists_the_ones_kept(finished_run, tokenizer, tmp_path):
    _, path = finished_run
    with pytest.raises(RunError) as err:
        export_run(path, tmp_path / "x", at=2, lm=fresh(tokenizer))
    assert "no checkpoint after 2 edits (it keeps those after [3])" in str(err.value)


# Partial cases: hparams of another model name their file; an escaped NUL in an edit is refused;
# a misspelt model name ends in one line at once instead of after the hub's retries.
def test_hparams_of_another_model_name_their_file(options, tokenizer):
    gpt2_xl = dataclasses.replace(options, hparams_fname="gpt2-xl.yaml")
    with pytest.raises(HparamsError) as err:
        run(gpt2_xl, fresh(tokenizer))
    assert str(err.value).startswith("/") and "hparams/R-ROME/gpt2-xl.yaml (used with tiny-llama): key 'layers': layer 17" in str(err.value)


@pytest.mark.parametrize("field", ["prompt", "subject", "target_new", "target_true"])
def test_a_control_character_in_an_edit_is_refused(field):
    fields = {"prompt": "The capital of {} is", "subject": "France", "target_new": "Rome", "target_true": "Paris"}
    fields[field] = fields[field][:3] + "\x00" + fields[field][3:]
    with pytest.raises(RequestError, match=rf"record 0: '{field}' contains the control character U\+0000 at position 3"):
        make_request(fields, "record 0")


def test_a_misspelt_model_name_fails_at_once_without_the_hub(monkeypatch, caches):
    import util.models

    class NoHub:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise AssertionError("the hub was asked")

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as without the variable (offline, the hub is never asked)
    monkeypatch.setattr(util.models, "AutoConfig", NoHub)
    monkeypatch.setattr(util.models, "AutoModelForCausalLM", NoHub)
    with pytest.raises(ModelLoadError, match=r"unknown model 'smollm2-13m': did you mean the embedded 'smollm2-135m'\?"):
        load_model("smollm2-13m", model_cache=caches.models)
    monkeypatch.setattr(util.models, "online", lambda *args, **kwargs: False)  # as on a machine without network
    with pytest.raises(ModelLoadError, match=r"unknown model 'some-org/some-model': .* cannot be reached"):
        load_model("some-org/some-model", model_cache=caches.models)
