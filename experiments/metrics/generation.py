"""Generation health of an edited model: fluency and consistency of free continuations (ROME).

Continuations come from `model.generate` with the KV cache, batched with LEFT padding (the one
place where it is right: new tokens must follow every prompt directly). Fluency is ROME's
weighted 2/3-gram entropy of each generated text (prompt included, as ROME does); consistency is
the TF-IDF cosine between a case's generated texts and its reference texts (by default the
attribute prompts: facts about subjects whose true attribute is target_new).
"""
from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from data.records import CaseRecord
from experiments.metrics.formulas import mean, ngram_entropy
from util.models import LoadedModel, input_device
from util.progress import progress

TERM = re.compile(r"(?u)\b\w\w+\b")  # sklearn TfidfVectorizer's default token pattern, lowercased


@dataclass(frozen=True)
class TfIdf:
    """sklearn-compatible TF-IDF (raw counts, smooth idf = ln((1+n)/(1+df)) + 1, l2 norm)."""

    vocab: dict[str, int]
    idf: np.ndarray

    @classmethod
    def fit(cls, texts: Iterable[str], min_df: int = 1, max_features: int | None = None) -> "TfIdf":
        df: Counter[str] = Counter()
        n = 0
        for text in texts:
            df.update(set(TERM.findall(text.lower())))
            n += 1
        if n == 0:
            raise ValueError("TF-IDF needs at least one text to fit")
        terms = [t for t, c in df.items() if c >= min_df]
        if max_features is not None:  # most frequent first; ties by term, so the cut is deterministic
            terms = sorted(terms, key=lambda t: (-df[t], t))[:max_features]
        terms.sort()
        idf = np.array([math.log((1 + n) / (1 + df[t])) + 1.0 for t in terms])
        return cls({t: i for i, t in enumerate(terms)}, idf)

    def vector(self, text: str) -> dict[int, float]:
        """Sparse l2-normalised tf-idf vector; terms outside the vocabulary are ignored."""
        counts = Counter(self.vocab[t] for t in TERM.findall(text.lower()) if t in self.vocab)
        weights = {i: c * float(self.idf[i]) for i, c in counts.items()}
        norm = math.sqrt(sum(w * w for w in weights.values()))
        return {i: w / norm for i, w in weights.items()} if norm > 0 else {}

    def similarity(self, a: str, b: str) -> float:
        """Cosine of the two texts' vectors; 0 when either has no vocabulary term."""
        va, vb = self.vector(a), self.vector(b)
        return float(sum(w * vb[i] for i, w in va.items() if i in vb))

    def save(self, path: str | Path) -> None:
        terms = sorted(self.vocab, key=self.vocab.__getitem__)
        Path(path).write_text(json.dumps({"terms": terms, "idf": self.idf.tolist()}))

    @classmethod
    def load(cls, path: str | Path) -> "TfIdf":
        data = json.loads(Path(path).read_text())
        return cls({t: i for i, t in enumerate(data["terms"])}, np.array(data["idf"], dtype=float))


@dataclass(frozen=True)
class GenerationResult:
    case_id: object
    texts: tuple[str, ...]  # prompt + continuation
    fluency: float | None  # mean n-gram entropy of the texts; None without generation prompts
    consistency: float | None  # None without reference texts or TF-IDF

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    top_k: int | None = 5,
    seed: int = 0,
    batch_size: int = 16,
    total_length: int | None = None,
) -> list[str]:
    """Continuations (without the prompt) of each prompt: top-k sampling (seeded; the global RNG
    is left as it was) or greedy with top_k=None. Prompts are batched by length. With
    total_length, each prompt continues until prompt + continuation hold that many tokens
    (ROME's generate_fast, max_out_len) instead of for max_new_tokens."""
    tok, device = lm.tok, input_device(lm.model)
    encoded = [tok(p)["input_ids"] for p in prompts]
    budget = [total_length - len(e) if total_length else max_new_tokens for e in encoded]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(prompts)
    sampling = {"do_sample": True, "top_k": top_k, "top_p": 1.0, "temperature": 1.0} if top_k else {"do_sample": False}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in progress(range(0, len(order), batch_size), desc=f"generating from {len(prompts)} prompts", unit="batch", leave=False):
            rows = order[start : start + batch_size]
            ids, mask = left_pad([encoded[i] for i in rows], tok.pad_token_id)
            longest = max(budget[i] for i in rows)
            if longest < 1:
                continue  # prompts already as long as total_length: nothing to add
            generated = lm.model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=longest,
                pad_token_id=tok.pad_token_id, **sampling,
            )
            for row, index in enumerate(rows):
                new = generated[row, ids.shape[1] : ids.shape[1] + max(budget[index], 0)]
                out[index] = tok.decode(new, skip_special_tokens=True)
    return out


def alphaedit_text(text: str) -> str:
    """The clean-up AlphaEdit's (ROME's) generate_fast applies before scoring: Unicode NFKD and
    blank lines turned into spaces."""
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) padded at the start, for generation."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, length - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, length - len(seq):] = 1
    return ids, mask


def evaluate_generation(
    lm: LoadedModel,
    records: Sequence[CaseRecord],
    tfidf: TfIdf | None,
    max_new_tokens: int = 64,
    top_k: int | None = 5,
    seed: int = 0,
    batch_size: int = 16,
    total_length: int | None = None,
    clean: Callable[[str], str] | None = None,
) -> list[GenerationResult]:
    """Generate from every record's generation prompts (all records batched together) and score
    fluency and consistency against the record's attribute prompts. `clean` is applied to each
    text (prompt + continuation) before scoring; total_length as in `generate`."""
    prompts = [p for r in records for p in r.generation_prompts]
    continuations = generate(lm, prompts, max_new_tokens, top_k, seed, batch_size, total_length)
    clean = clean or (lambda text: text)
    results, at = [], 0
    for record in records:
        n = len(record.generation_prompts)
        texts = tuple(clean(p + c) for p, c in zip(record.generation_prompts, continuations[at : at + n]))
        at += n
        references = record.attribute_prompts
        consistency = tfidf.similarity(" ".join(texts), " ".join(references)) if tfidf and references and texts else None
        fluency = mean([ngram_entropy(t) for t in texts]) if texts else None
        results.append(GenerationResult(record.case_id, texts, fluency, consistency))
    return results


def summarize_generation(results: Sequence[GenerationResult]) -> dict[str, float | None]:
    fluency = mean([r.fluency for r in results if r.fluency is not None])
    consistency = mean([r.consistency for r in results if r.consistency is not None])
    return {"fluency": None if math.isnan(fluency) else fluency,
            "consistency": None if math.isnan(consistency) else consistency, "n_cases": len(results)}
