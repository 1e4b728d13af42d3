"""Keys: the input k of the edited down projection at the fact token (the subject's last token
by default). k* averages k over the prompt prefixed by each context template, within each
template group and then across groups (`groups`, see rome/templates.template_groups: one group is
ROME's plain mean, [1, n] is MEMIT's compute_ks); k_bare is the key of the bare prompt (template
"{}"), which the original ROME update uses.

All prompts of all requests go through the model in one right-padded forward, which also reads
the output at a "site" (the down projection's or a layer's output at the bare prompt): MEMIT-style
editors need it as the current value there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from util.models import LoadedModel, input_device
from util.nethook import TraceDict
from util.requests import EditRequest
from util.tokens import FactToken, right_pad, subject_position


@dataclass
class KeyResult:
    k_star: dict[int, torch.Tensor]  # layer -> (n_requests, m) float64, template-averaged
    k_bare: dict[int, torch.Tensor]  # layer -> (n_requests, m), bare prompt
    site_output: torch.Tensor | None  # (n_requests, d) at the bare prompt's fact token
    site_mean: torch.Tensor | None  # (n_requests, d) averaged over the templates as k* is


def templated_prompts(request: EditRequest, templates: list[str]) -> list[str]:
    """The request's prompt placed in each context template (subject slot kept as "{}")."""
    return [template.format(request.prompt) for template in templates]


@torch.no_grad()
def compute_keys(
    lm: LoadedModel,
    requests: list[EditRequest],
    layers: list[int],
    templates: list[str],
    fact_token: FactToken,
    site: str | None = None,
    chunk_size: int = 256,
    groups: list[int] | None = None,
) -> KeyResult:
    """Keys at `layers` for every request; templates[0] must be the bare template "{}".

    `site` names a module whose output is read at the bare prompt's fact token and averaged like
    k* (or None). `groups`: sizes of the consecutive template groups k* averages within, then
    across (None: one group, the plain mean). Requests go through in chunks of `chunk_size` (one
    padded forward each) to bound memory."""
    groups = groups or [len(templates)]
    if sum(groups) != len(templates):
        raise ValueError(f"template groups {groups} do not cover the {len(templates)} templates")
    if len(requests) > chunk_size:
        parts = [compute_keys(lm, requests[i:i + chunk_size], layers, templates, fact_token, site, chunk_size, groups)
                 for i in range(0, len(requests), chunk_size)]
        join = lambda name: torch.cat([getattr(p, name) for p in parts]) if site else None  # noqa: E731
        return KeyResult(
            {layer: torch.cat([p.k_star[layer] for p in parts]) for layer in layers},
            {layer: torch.cat([p.k_bare[layer] for p in parts]) for layer in layers},
            join("site_output"), join("site_mean"),
        )
    assert templates[0] == "{}", "the first context template must be the bare prompt"
    sequences, positions = [], []
    for request in requests:
        for prompt in templated_prompts(request, templates):
            ids, position = subject_position(lm.tok, prompt, request.subject, fact_token)
            sequences.append(ids)
            positions.append(position)
    ids, mask = right_pad(sequences, lm.tok.pad_token_id)
    device = input_device(lm.model)
    modules = [lm.arch.down_proj(layer) for layer in layers] + ([site] if site else [])
    with TraceDict(lm.model, modules, retain_input=True, stop=True) as traces:
        lm.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    rows = torch.arange(len(sequences))
    index = torch.tensor(positions)
    n, t = len(requests), len(templates)
    k_star, k_bare = {}, {}
    for layer in layers:
        keys = traces[lm.arch.down_proj(layer)].input
        keys = keys[rows.to(keys.device), index.to(keys.device)].double().cpu().reshape(n, t, -1)
        k_star[layer] = group_mean(keys, groups)
        k_bare[layer] = keys[:, 0]
    site_output = site_mean = None
    if site:
        out = traces[site].output
        out = out[rows.to(out.device), index.to(out.device)].double().cpu().reshape(n, t, -1)
        site_output, site_mean = out[:, 0], group_mean(out, groups)
    return KeyResult(k_star, k_bare, site_output, site_mean)


def group_mean(per_template: torch.Tensor, groups: list[int]) -> torch.Tensor:
    """(n, t, dim) -> (n, dim): the mean within each consecutive group of templates, then across groups."""
    return torch.stack([part.mean(dim=1) for part in per_template.split(groups, dim=1)], dim=1).mean(dim=1)
