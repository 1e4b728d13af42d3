"""Edit requests: what one fact edit asks for, validated once where it enters the program."""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any, Mapping

from util.errors import RequestError


@dataclass(frozen=True)
class EditRequest:
    prompt: str  # contains "{}" where the subject goes, e.g. "{} plays the sport of"
    subject: str
    target_new: str  # without leading space; tokenisation adds the separator
    target_true: str | None = None
    case_id: str | int | None = None

    @property
    def text(self) -> str:
        """The rewrite prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    def label(self) -> str:
        return f"case {self.case_id}" if self.case_id is not None else f"request '{self.prompt}' / '{self.subject}'"


def make_request(fields: Mapping[str, Any], where: str = "") -> EditRequest:
    """Build and validate a request from plain fields; errors name `where` (file and record)."""
    if not where:
        where = f"case {fields['case_id']}" if fields.get("case_id") is not None else "request"
    for key in ("prompt", "subject", "target_new"):
        value = fields.get(key)
        if not isinstance(value, str) or not value.strip():
            raise RequestError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
    prompt, subject = fields["prompt"], fields["subject"]
    target_true = fields.get("target_true")
    if target_true is not None and (not isinstance(target_true, str) or not target_true.strip()):
        raise RequestError(f"{where}: 'target_true' must be a non-empty string when given, got {target_true!r}")
    for key in ("prompt", "subject", "target_new", "target_true"):
        bad = next((c for c in fields.get(key) or "" if unicodedata.category(c) == "Cc" and c not in "\t\n"), None)
        if bad is not None:  # e.g. a NUL from an escape in YAML ("\0") or JSON ("\u0000"): never part of a fact
            raise RequestError(f"{where}: '{key}' contains the control character U+{ord(bad):04X} "
                               f"at position {fields[key].index(bad)}: {fields[key]!r}")
    if prompt.count("{}") != 1:
        if subject in prompt:  # a filled-in prompt: template it at the subject's first occurrence
            prompt = prompt.replace(subject, "{}", 1)
        else:
            raise RequestError(f"{where}: prompt {prompt!r} has no '{{}}' for the subject and does not contain subject {subject!r}")
    if "{" in prompt.replace("{}", "", 1) or "}" in prompt.replace("{}", "", 1):
        raise RequestError(f"{where}: prompt {prompt!r} has stray braces besides one '{{}}'")
    return EditRequest(
        prompt=prompt,
        subject=subject,
        target_new=fields["target_new"].strip(),
        target_true=target_true.strip() if target_true else None,
        case_id=fields.get("case_id"),
    )
