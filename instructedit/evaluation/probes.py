"""A case's probes: every scored input of one record (rewrite, rephrases, portability, locality), edit rows first."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from instructedit.records import EditRecord
from instructedit.tasks.collate import Collator

SCORED = ("reliability", "generalization", "portability")  # accuracy against the gold answer
OPPOSITE = "opposite"  # ConvSent responses of the other sentiment: scored only for the sentiment margin


@dataclass(frozen=True)
class Probe:
    """One scored input of a case: its family (reliability, ...), sub-key, prompt (as fed) and answer."""

    family: str
    kind: str
    prompt: str
    answer: str


def case_probes(collator: Collator, record: EditRecord, instruction: int | None) -> list[Probe]:
    """Every probe of a record. Edit, rephrase and portability prompts are wrapped; locality never is.

    ConvSent: reliability = the first target response (part of the edit), generalization = the
    held-out target responses ``[k:2k]`` (as ``Collator.meta_batch``'s edit_outer), plus the first
    ``k`` opposite responses for the sentiment margin.
    """
    prompt = collator.wrap(record, record.prompt, instruction)
    probes = [Probe("reliability", "default", prompt, record.target_new)]
    if record.convsent is not None:
        k, cs = collator.convsent_pairs, record.convsent
        probes += [Probe("generalization", "default", prompt, r) for r in cs.target_responses[k : 2 * k]]
        probes += [Probe(OPPOSITE, "default", prompt, r) for r in cs.opposite_responses[:k]]
    else:
        probes += [Probe("generalization", "default", collator.wrap(record, r, instruction), record.target_new) for r in record.rephrase]
        probes += [Probe("portability", q.kind, collator.wrap(record, q.prompt, instruction), q.answer) for q in record.portability]
    probes += [Probe("locality", q.kind, q.prompt, q.answer) for q in record.locality]
    return probes


def edit_rows_first(probes: list[Probe], pairs: Sequence[tuple[str, str]], match: bool = True) -> list[Probe]:
    """Reorder so the edit input's rows come first; an edit row that is no probe (ConvSent's 2nd..k-th; every edit row
    when ``match`` is off) is family 'edit', which is not scored."""
    rest = list(probes)
    head = []
    for prompt, answer in pairs:
        found = next((p for p in rest if (p.prompt, p.answer) == (prompt, answer)), None) if match else None
        if found is not None:
            rest.remove(found)
        head.append(found or Probe("edit", "default", prompt, answer))
    return head + rest
