"""Tiny random models built from configs (no download) and the shared reference data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from util.arch import arch_for
from util.environment import Environment
from util.models import LoadedModel, embedded_tokenizer, load_model
from util.paths import PROJECT_ROOT, Caches

# The test session reads the environment once, as a command line does. The model cache is pinned
# before any test isolates KEDIT_CACHE: the dequantised embedded model (~20 s to build) is shared
# by all tests, sessions and the command lines they start.
MODEL_CACHE = Environment.read().caches.models
os.environ.setdefault("KEDIT_MODEL_CACHE", str(MODEL_CACHE))


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's real tokenizer (cached with its dequantised copy)."""
    return embedded_tokenizer("smollm2-135m", MODEL_CACHE)


def tiny_gpt2_model(vocab_size: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=4, n_embd=48, n_head=4, n_positions=256, vocab_size=vocab_size,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval().requires_grad_(False)


def tiny_llama_model(vocab_size: int, seed: int = 0, intermediate_size: int = 96) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=4, hidden_size=48, intermediate_size=intermediate_size, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, vocab_size=vocab_size,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


@pytest.fixture(params=["gpt2", "llama"])
def tiny(request, tokenizer) -> LoadedModel:
    build = tiny_gpt2_model if request.param == "gpt2" else tiny_llama_model
    model = build(len(tokenizer))
    return LoadedModel(model, tokenizer, arch_for(model), f"tiny-{request.param}")


@pytest.fixture
def tiny64(tiny) -> LoadedModel:
    """`tiny` in float64, for checks of the update equations to high precision."""
    tiny.model.double()
    return tiny


@pytest.fixture
def tiny_gpt2(tokenizer) -> LoadedModel:
    model = tiny_gpt2_model(len(tokenizer))
    return LoadedModel(model, tokenizer, arch_for(model), "tiny-gpt2")


@pytest.fixture
def tiny_llama(tokenizer) -> LoadedModel:
    model = tiny_llama_model(len(tokenizer))
    return LoadedModel(model, tokenizer, arch_for(model), "tiny-llama")


@pytest.fixture(scope="session")
def embedded() -> LoadedModel:
    return load_model("smollm2-135m", model_cache=MODEL_CACHE)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = Path(os.environ.get("KEDIT_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"reference data not found at {path} (set KEDIT_SHARED_DATA)")
    return path


@pytest.fixture(autouse=True)
def caches(tmp_path_factory, monkeypatch) -> Caches:
    """Tests write caches (statistics, templates, corpora) to a temporary folder: code a test calls
    is given these folders; command lines it runs (in or out of process) read the same root from
    KEDIT_CACHE at their edge."""
    root = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("KEDIT_CACHE", str(root))
    return Caches(root, MODEL_CACHE)


@pytest.fixture(scope="session")
def embedded_caches(tmp_path_factory) -> Caches:
    """One cache folder for the embedded model's slow tests: its statistics (a minute per layer set
    on 2 cores) and context templates are computed once per session, not once per test. Those
    tests pass it to what they call; none of them tests caching itself."""
    return Caches(tmp_path_factory.mktemp("embedded-cache"), MODEL_CACHE)


@pytest.fixture(autouse=True)
def threads(request):
    """Every test on one thread but the embedded model's and the slow ones (all cores). Tiny models
    run fastest on one thread, and OpenMP's threads spin-wait: with other processes on the 2 cores
    a tiny float64 conformance test took 149 s on two threads and 5 s on one."""
    if "embedded" in request.fixturenames or request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fresh_llama(tokenizer) -> LoadedModel:
    """A new tiny random Llama (the same weights every call) with the embedded tokenizer."""
    model = tiny_llama_model(len(tokenizer))
    return LoadedModel(model, tokenizer, arch_for(model), "tiny-llama")
