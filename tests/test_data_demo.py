"""The demo edits are facts the embedded model knows: before editing it prefers target_true to
target_new on each prompt and paraphrase, and each neighbourhood answer to target_new."""
import pytest
import torch

from data.cases import load_cases
from util.paths import PROJECT_ROOT
from util.tokens import encode_with_target, right_pad


@torch.no_grad()
def mean_logprobs(lm, pairs: list[tuple[str, str]]) -> list[float]:
    """Mean per-token log-probability of " " + target after each prompt (teacher-forced), in one
    right-padded batch: pads at the end never shift the real tokens' positions."""
    encoded = [encode_with_target(lm.tok, prompt, target) for prompt, target in pairs]
    ids, mask = right_pad([e[0] for e in encoded], lm.tok.pad_token_id)
    logprobs = torch.log_softmax(lm.model(input_ids=ids, attention_mask=mask).logits.double(), dim=-1)
    means = []
    for row, (seq, start) in enumerate(encoded):
        targets = torch.tensor(seq[start:])
        means.append(logprobs[row, start - 1 : len(seq) - 1].gather(1, targets[:, None]).mean().item())
    return means


@pytest.mark.slow
def test_embedded_model_knows_the_demo_facts(embedded):
    cases = load_cases("custom", custom_path=PROJECT_ROOT / "data" / "demo_edits.yaml")
    checks = []  # (case, prompt, expected answer); each is compared with the case's target_new
    for case in cases:
        request = case.request
        checks += [(case, request.text, request.target_true)]
        checks += [(case, p, request.target_true) for p in case.paraphrase_prompts]
        checks += [(case, p, answer) for p, answer in case.neighborhood]
    expected = mean_logprobs(embedded, [(prompt, answer) for _, prompt, answer in checks])
    new = mean_logprobs(embedded, [(prompt, case.request.target_new) for case, prompt, _ in checks])
    failures = [
        f"case {case.case_id}: {prompt!r} prefers {case.request.target_new!r} to {answer!r} by {n - e:.2f}"
        for (case, prompt, answer), e, n in zip(checks, expected, new) if e <= n
    ]
    assert len(checks) > 3 * len(cases) and not failures, "\n".join(failures)
