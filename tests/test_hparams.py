from dataclasses import FrozenInstanceError, dataclass, field
from typing import Literal

import pytest

from util.errors import HparamsError
from editors import load_algorithm_hparams
from util.hparams import load_hparams, parse_override


@dataclass(frozen=True)
class Example:
    layers: list[int]
    v_lr: float
    fact_token: Literal["subject_last", "last"]
    mom2_adjustment: bool
    context_template_length_params: list[list[int]] = field(default_factory=lambda: [[5, 10]])


GOOD = "layers: [4]\nv_lr: 0.5\nfact_token: subject_last\nmom2_adjustment: true\n"


def write(tmp_path, text):
    path = tmp_path / "h.yaml"
    path.write_text(text)
    return path


def test_loads_into_frozen_dataclass_with_coercion(tmp_path):
    hp = load_hparams(Example, write(tmp_path, GOOD.replace("0.5", "1")))
    assert hp.layers == [4] and hp.v_lr == 1.0 and isinstance(hp.v_lr, float)
    with pytest.raises(FrozenInstanceError):
        hp.v_lr = 2.0


@pytest.mark.parametrize(
    "text, fragment",
    [
        (GOOD + "rewrite_module_tmp: x\n", "unknown key 'rewrite_module_tmp'"),
        (GOOD.replace("v_lr: 0.5\n", ""), "missing key 'v_lr'"),
        (GOOD.replace("0.5", "fast"), "key 'v_lr' must be float"),
        (GOOD.replace("[4]", "[4.5]"), "key 'layers' must be list[int]"),
        (GOOD.replace("true", "'yes'"), "key 'mom2_adjustment' must be bool"),
        (GOOD.replace("subject_last", "first"), "key 'fact_token' must be"),
        ("layers: [4\n", "not valid YAML"),
        ("- 1\n", "expected a mapping"),
    ],
)
def test_bad_files_fail_with_one_line_naming_file_and_key(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(HparamsError) as err:
        load_hparams(Example, path)
    message = str(err.value)
    assert fragment in message and str(path) in message and "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(HparamsError, match="does not exist"):
        load_hparams(Example, tmp_path / "nope.yaml")


def test_set_overrides_are_typed_and_checked(tmp_path):
    path = write(tmp_path, GOOD)
    hp = load_hparams(Example, path, ["v_lr=0.1", "layers=[3, 4]", "mom2_adjustment=false"])
    assert hp.v_lr == 0.1 and hp.layers == [3, 4] and hp.mom2_adjustment is False
    with pytest.raises(HparamsError, match="unknown key 'v_lrr'"):
        load_hparams(Example, path, ["v_lrr=0.1"])
    with pytest.raises(HparamsError, match="key 'layers' must be"):
        load_hparams(Example, path, ["layers=four"])
    with pytest.raises(HparamsError, match="expected key=value"):
        parse_override("v_lr")


SMOLLM = "smollm2-135m.yaml"


@pytest.mark.parametrize("alg, override, key, allowed", [
    ("R-ROME", "v_lr=.nan", "v_lr", "> 0"),
    ("R-ROME", "v_lr=0", "v_lr", "> 0"),
    ("R-ROME", "v_lr=-0.5", "v_lr", "> 0"),
    ("R-ROME", "v_num_grad_steps=0", "v_num_grad_steps", ">= 1"),
    ("R-ROME", "mom2_update_weight=-1", "mom2_update_weight", "> 0"),
    ("R-ROME", "clamp_norm_factor=0", "clamp_norm_factor", "> 0"),
    ("R-ROME", "kl_factor=-1", "kl_factor", ">= 0"),
    ("R-ROME", "v_weight_decay=-1", "v_weight_decay", ">= 0"),
    ("R-ROME", "mom2_n_samples=0", "mom2_n_samples", ">= 1"),
    ("R-ROME", "mom2_sample_tokens=0", "mom2_sample_tokens", ">= 1"),
    ("R-ROME", "v_loss_threshold=-1", "v_loss_threshold", ">= 0"),
    ("R-ROME", "layers=[-1]", "layers", ">= 0"),
    ("EMMET", "emmet_lambda=-1e-3", "emmet_lambda", ">= 0"),
    ("AlphaEdit", "L2=-1", "L2", "> 0"),
    ("ENCORE", "update_norm_lambda=-1", "update_norm_lambda", ">= 0"),
])
def test_out_of_range_values_name_the_key_and_the_range(alg, override, key, allowed):
    with pytest.raises(HparamsError) as err:
        load_algorithm_hparams(alg, SMOLLM, [override])
    message = str(err.value)
    assert f"key '{key}' must be a finite number {allowed}" in message and "\n" not in message


def test_numbers_read_as_yaml_1_2(tmp_path):
    hp = load_algorithm_hparams("EMMET", SMOLLM, ["emmet_lambda=1e-9", "mom2_n_samples=1E5", "v_lr=.5"])
    assert hp.emmet_lambda == 1e-9 and hp.mom2_n_samples == 100000 and isinstance(hp.mom2_n_samples, int) and hp.v_lr == 0.5
    path = write(tmp_path, GOOD.replace("0.5", "5e-1"))
    assert load_hparams(Example, path).v_lr == 0.5
    with pytest.raises(HparamsError, match="key 'mom2_n_samples' must be int"):
        load_algorithm_hparams("EMMET", SMOLLM, ["mom2_n_samples=1.5"])


def test_a_layer_past_the_model_names_the_layer():
    with pytest.raises(HparamsError) as err:
        load_algorithm_hparams("R-ROME", SMOLLM, ["layers=[99]"])
    assert str(err.value).split(": ", 1)[1].startswith("key 'layers': layer 99")
    hp = load_algorithm_hparams("MEMIT", SMOLLM, ["layers=[2, 40]", "v_loss_layer=40"])
    with pytest.raises(HparamsError, match=r"key 'layers': layer 40 does not exist in a model with 30 layers \(0-29\)"):
        hp.check_model(30)


def test_rome_and_r_rome_fix_original_implementation(tmp_path):
    """The editors set it (Editor.fixed); the shipped files no longer carry it, an old file that
    repeats the value still loads, one that contradicts it fails in one line naming the key."""
    from editors import ALGORITHMS, _algorithm_of
    from util.paths import PROJECT_ROOT

    rome, r_rome = load_algorithm_hparams("ROME", SMOLLM), load_algorithm_hparams("R-ROME", SMOLLM)
    assert rome.original_implementation is True and r_rome.original_implementation is False
    assert _algorithm_of(rome) is ALGORITHMS["ROME"] and _algorithm_of(r_rome) is ALGORITHMS["R-ROME"]
    old = write(tmp_path, (PROJECT_ROOT / "hparams" / "ROME" / SMOLLM).read_text() + "original_implementation: true\n")
    assert load_algorithm_hparams("ROME", str(old)) == rome
    with pytest.raises(HparamsError) as err:
        load_algorithm_hparams("R-ROME", str(old))
    assert "key 'original_implementation' is set by the algorithm to False, got True" in str(err.value) and str(old) in str(err.value)
    with pytest.raises(HparamsError, match="is set by the algorithm"):
        load_algorithm_hparams("ROME", SMOLLM, ["original_implementation=false"])
    from experiments.pipeline.run_config import RunOptions
    from experiments.pipeline.session import resolve_hparams
    from util.errors import RunError

    assert resolve_hparams(RunOptions(alg_name="ROME"), rome, None, None) is rome
    with pytest.raises(RunError, match="R-ROME takes ROMEHyperParams with original_implementation=False, got ROMEHyperParams with original_implementation=True"):
        resolve_hparams(RunOptions(alg_name="R-ROME"), rome, None, None)
