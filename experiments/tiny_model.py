"""Write a tiny random model of any architecture in util/arch.py's table to a local folder: its
config class's defaults at a tiny shape, random weights (seeded) and the embedded model's
tokenizer, so that the whole pipeline runs on a new architecture in seconds, offline.

    python experiments/tiny_model.py --model_type gemma3_text --out /tmp/tiny-gemma3
    python experiments/evaluate.py --alg_name R-ROME --model_name /tmp/tiny-gemma3 --hparams auto ...

The tests build the same models (tests/test_arch.py). Each architecture's shape turns on what
makes it differ from Llama where a tiny default would hide it: a short sliding window, strong
logit soft-capping, partial rotary embeddings, tied and untied unembeddings.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from util.cli import run_cli
from util.environment import Environment
from util.models import embedded_tokenizer

LAYERS, HIDDEN, MLP, HEADS, KV_HEADS, HEAD_DIM, POSITIONS = 4, 48, 96, 4, 2, 12, 256
_GEMMA = dict(head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, sliding_window=6, final_logit_softcapping=0.3)
# GELU MLPs at the default init (0.02) are nearly linear: the keys fill only d of their m dimensions
# and C0 is singular. A larger init makes them as full-rank as a trained model's.
_GELU = dict(initializer_range=0.2)

# model_type -> the config's arguments on top of the shared tiny shape (see tiny_config)
TINY: dict[str, dict] = {
    "gpt2": dict(_GELU, n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, n_positions=POSITIONS, n_inner=MLP, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "gptj": dict(_GELU, n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, n_positions=POSITIONS, n_inner=MLP, rotary_dim=6,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False),
    "gpt_neox": dict(_GELU, rotary_pct=0.5, use_parallel_residual=True, hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False),
    "llama": dict(tie_word_embeddings=True),
    "mistral": dict(sliding_window=6, tie_word_embeddings=False),
    "qwen2": dict(tie_word_embeddings=False),  # biases on q, k, v
    "qwen3": dict(head_dim=HEAD_DIM, tie_word_embeddings=True),  # q/k norms
    "gemma": dict(head_dim=HEAD_DIM, tie_word_embeddings=True),  # embeddings scaled by sqrt(d), norms (1 + w)
    # post-norms, soft-capping; its eager attention gives NaN in float64 where a padded row's sliding
    # window holds only padding (transformers 5.23), so its window is longer than the tests' rows
    "gemma2": dict(_GEMMA, sliding_window=64, attn_logit_softcapping=5.0),
    "gemma3_text": dict(_GEMMA, layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2)),  # + q/k norms
    "phi3": dict(partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0, tie_word_embeddings=False),  # fused qkv, gate_up
    "olmo2": dict(tie_word_embeddings=False),  # post-norms only, q/k norms over all heads
}
SHARED = dict(num_hidden_layers=LAYERS, hidden_size=HIDDEN, intermediate_size=MLP, num_attention_heads=HEADS,
              num_key_value_heads=KV_HEADS, max_position_embeddings=POSITIONS)


def tiny_config(model_type: str, tok: PreTrainedTokenizerBase) -> PretrainedConfig:
    """`model_type`'s config class at the tiny shape, its vocabulary and special tokens from `tok`."""
    shared = {} if model_type in ("gpt2", "gptj") else SHARED
    if model_type == "gpt_neox":
        shared = {k: v for k, v in SHARED.items() if k != "num_key_value_heads"}
    return AutoConfig.for_model(model_type, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id, **{**shared, **TINY[model_type]})


def tiny_model(model_type: str, tok: PreTrainedTokenizerBase, seed: int = 0) -> torch.nn.Module:
    """A random model of `model_type` at the tiny shape (seeded), in eval mode without gradients.
    Norm weights and biases are perturbed too: as initialised they are all alike (ones or zeros), so
    one norm could stand in for another unnoticed."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, tok), dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval().requires_grad_(False)


def write_tiny_model(model_type: str, folder: Path, tok: PreTrainedTokenizerBase, seed: int = 0) -> Path:
    """save_pretrained of tiny_model and the tokenizer: a folder load_model reads like any other."""
    folder = Path(folder)
    tiny_model(model_type, tok, seed).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_type", required=True, help=", ".join(TINY))
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.model_type not in TINY:
        parser.error(f"--model_type: choose from {', '.join(TINY)}")
    tok = embedded_tokenizer("smollm2-135m", Environment.read().caches.models)
    print(write_tiny_model(args.model_type, Path(args.out), tok, args.seed))
    return 0


if __name__ == "__main__":
    run_cli(main)
