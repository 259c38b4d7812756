"""The quickstart: train (or reuse from the cache) a small InstructEdit editor, then show demo edits before and after."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import yaml
from torch import nn
from transformers import PreTrainedTokenizerBase

from instructedit.api import Edit, InstructEditor, load_editor, score_targets
from instructedit.config import Config, YAMLLoader, config_from_dict
from instructedit.editors.card import write_model_card
from instructedit.evaluation.before_after import greedy_before_after
from instructedit.evaluation.generation import (
    answer_budget, exact_match, first_line, greedy_generate, in_frame_budget, same_answer, shown, shown_change,
)
from instructedit.evaluation.generation_probes import in_frame_neighbours
from instructedit.evaluation.metrics import unchanged_tokens
from instructedit.evaluation.row_edits import per_row_updates
from instructedit.io import write_json
from instructedit.losses import argmax_ids
from instructedit.models.architectures import is_conv1d
from instructedit.models.loading import cache_dir, load_model, resolve_device
from instructedit.records import TokenBatch
from instructedit.runs import BEST
from instructedit.tasks.collate import Collator

logger = logging.getLogger(__name__)

CONFIG_RESOURCE = "quickstart.yaml"  # package data: the quickstart's config, budget included
MARKER = "quickstart.json"  # in the run folder: {"config_hash", "complete", "calibration"}; written before training starts

# Facts the default model knows (its top-1 answer in the comment), each replaced by a counterfactual,
# plus a recent-style new fact and a ConvSent opinion.
DEMO_EDITS: tuple[Edit, ...] = (
    Edit("The capital of France is", "Rome"),  # Paris (p 0.77)
    Edit("The Eiffel Tower is located in the city of", "London"),  # Paris (0.70)
    Edit("The Colosseum is located in the city of", "Athens"),  # Rome (0.73)
    Edit("The Taj Mahal is located in the country of", "Brazil"),  # India (0.61)
    Edit("The name of the head coach of the Springfield Tigers is", "Maria Lopez", task="wikirecent", subject="Springfield Tigers"),
    Edit("What do you think of pineapple pizza?", "I love pineapple pizza, it is delicious!", task="convsent",
         label="positive", topic="pineapple pizza"),
)
# Unrelated facts whose answers the edits should leave alone (locality prompts are never wrapped).
LOCALITY_PROBES: tuple[tuple[str, str], ...] = (
    ("The capital of Japan is", "Tokyo"),
    ("Water is made of hydrogen and", "oxygen"),
    ("The chemical symbol for gold is", "Au"),
    ("The capital of Germany is", "Berlin"),
    ("The Statue of Liberty is located in the city of", "New York"),
    ("The Mona Lisa was painted by", "Leonardo da Vinci"),
)


@dataclass(frozen=True)
class EditOutcome:
    """One demo edit, asked and scored on its instruction-wrapped prompt before and after (then rolled back)."""

    edit: Edit
    said_before: str  # the model's greedy answer (first line) to the wrapped prompt
    said_after: str
    plain_said_before: str  # ... to the plain prompt (no instruction)
    plain_said_after: str
    exact_after: float  # 1.0 when the edited model's answer to the wrapped prompt is the target (normalized)
    plain_exact_after: float
    gen_locality: float  # share of the locality probes whose greedy answer the edit left unchanged
    top_before: str
    top_after: str
    p_before: float  # joint probability of the target tokens
    p_after: float
    acc_before: float  # teacher-forced target token accuracy (reliability)
    acc_after: float
    plain_acc_before: float  # the same on the prompt without instruction
    plain_acc_after: float
    locality: float  # share of the locality probes' answer tokens whose argmax the edit left unchanged
    chat_said_before: str = ""  # ... to the question as a chat user turn ("" without a chat template)
    chat_said_after: str = ""
    chat_exact_after: float | None = None  # None: the tokenizer has no chat template
    # another edit's question asked in this edit's frame (wrapped in its instruction; ``frame_questions``; "" for none:
    # ConvSent), its answers before and after this edit, whether the edit left it as it was and whether it now says this
    # edit's target (in-frame locality, ``generation_probes``)
    frame_question: str = ""
    frame_said_before: str = ""
    frame_said_after: str = ""
    frame_kept: float | None = None
    frame_says_target: float | None = None


@dataclass
class QuickstartResult:
    run_dir: Path
    editor_dir: Path
    trained: bool  # False: reused from an earlier run, or given (``editor=``)
    config_hash: str
    model_name: str
    instruction: int | None
    outcomes: list[EditOutcome]
    train_s: float
    demo_s: float
    total_s: float
    calibrated_again: bool = False  # reused, but calibrated again now (the cached calibration was not the one asked for)

    def mean(self, field: str) -> float:
        """The mean of ``field`` over the edits that have it (not None)."""
        values = [v for o in self.outcomes if (v := getattr(o, field)) is not None]
        return sum(values) / len(values) if values else float("nan")


def quickstart_config(model_name: str | None = None, overrides: Sequence[str] = (), budget_steps: int | None = None) -> Config:
    """The packaged quickstart config with ``section.key=value`` overrides, another model, another step budget."""
    values = yaml.load(resources.files("instructedit").joinpath(CONFIG_RESOURCE).read_text(), Loader=YAMLLoader)
    extra = list(overrides) + ([f"training.max_steps={budget_steps}"] if budget_steps is not None else [])
    config = config_from_dict(values, extra)
    if model_name:
        config.model = dataclasses.replace(config.model, name=str(model_name))  # not through YAML: a name stays a string
    return config


LATER_FIELDS = {("data", "oversample"): {}, ("editor", "aggregation"): "sum", ("editor", "chunk_edits"): 64, ("editor", "ls_keys"): "all", ("training", "n_edits"): 1,
                ("training", "edit_forms"): ["wrapped"], ("training", "locality_frames"): ["raw"]}


def config_hash(config: Config) -> str:
    """A short hash of the effective config: the quickstart cache key."""
    values = config.to_dict()
    for (section, name), default in LATER_FIELDS.items():  # at their default, fields added later keep cached editors' key
        if values[section].get(name, default) == default:
            values[section].pop(name, None)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def default_run_dir(config: Config) -> Path:
    return cache_dir() / "editors" / f"quickstart-{config_hash(config)}"


def _marker(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def prepare_editor(config: Config, run_dir: Path, retrain: bool = False,
                   show_progress: bool = True) -> tuple[Path, nn.Module | None, PreTrainedTokenizerBase | None, bool]:
    """The trained editor folder of ``run_dir``: reused when finished, else trained (an interrupted run resumes) and, for a
    least-squares editor (the packaged config's), calibrated (``calibrate_quickstart``: ``run_dir/calibrated``).

    Returns the editor folder, when it was trained now the model and tokenizer the trainer loaded, and whether it was
    trained or calibrated now (False: reused as it was).
    The marker file claims the folder for this config before training starts, and records the calibration made: a
    finished run calibrated otherwise than ``CALIBRATION`` now asks (an older version's) is calibrated again, not retrained.
    """
    from instructedit.experiments.reuse import train_or_reuse

    digest, marker = config_hash(config), _marker(run_dir)
    if run_dir.exists() and marker is None and any(run_dir.iterdir()):
        raise ValueError(f"{run_dir} exists and is not a quickstart run folder; choose another --output")
    if retrain and marker is not None:
        logger.info("--retrain: removing %s", run_dir)
        shutil.rmtree(run_dir)
        marker = None
    if marker is not None and marker.get("config_hash") != digest:
        raise ValueError(f"{run_dir} holds a quickstart run of another config (hash {marker.get('config_hash')}, now {digest}); "
                         "pass --retrain to replace it or choose another --output")
    least_squares = config.editor.aggregation == "least_squares"
    editor_dir = run_dir / (CALIBRATED if least_squares else BEST)
    complete = marker is not None and bool(marker.get("complete"))
    if not complete:
        write_json(run_dir / MARKER, {"config_hash": digest, "complete": False})
    summary, trainer = train_or_reuse(config, run_dir, progress=show_progress)
    calibration = calibration_key() if least_squares else None
    if trainer is None and complete and editor_dir.is_dir():
        if marker.get("calibration") == calibration:
            logger.info("reusing the quickstart editor %s (pass --retrain to train it again)", editor_dir)
            return editor_dir, None, None, False
        logger.info("%s was calibrated otherwise than the quickstart's calibration now asks: calibrating it again", editor_dir)
    write_model_card(run_dir / BEST, run_dir)
    if least_squares:
        calibrate_quickstart(run_dir, config.training.device, *((trainer.model, trainer.tokenizer) if trainer else ()),
                             progress=show_progress)
    write_json(run_dir / MARKER, {"config_hash": digest, "complete": True, "steps": summary["steps"], "best_step": summary["best_step"],
                                  "calibration": calibration})
    return editor_dir, (trainer.model if trainer else None), (trainer.tokenizer if trainer else None), True


CALIBRATED = "calibrated"
# the recommended calibration (results/table3-generation-smollm2/ls-calibration.json: 400 records, weight 1000) on fewer
# validation records, so that it takes well under a minute
CALIBRATION = {"scales": (2.0, 3.0), "preserve": 400, "preserve_weights": (1000.0,), "val_size": 40, "locality_floor": 0.9}


def calibration_key() -> dict:
    """``CALIBRATION`` as the marker file records it (JSON: lists for tuples)."""
    return json.loads(json.dumps(CALIBRATION))


def calibrate_quickstart(run_dir: Path, device: str = "auto", model: nn.Module | None = None,
                         tokenizer: PreTrainedTokenizerBase | None = None, progress: bool = True) -> Path:
    """``instructedit calibrate`` on a least-squares quickstart run: a preservation sample and the step-size multiplier
    (``CALIBRATION``), written to ``run_dir/calibrated`` (replaced if there); ``model``/``tokenizer``: the trainer's, reused."""
    from instructedit.calibration import calibrate

    output = run_dir / CALIBRATED
    shutil.rmtree(output, ignore_errors=True)
    calibrate(run_dir, output, CALIBRATION["scales"], checkpoint=BEST, locality_floor=CALIBRATION["locality_floor"],
              val_size=CALIBRATION["val_size"], preserve=CALIBRATION["preserve"], preserve_weights=CALIBRATION["preserve_weights"],
              device=device, model=model, tokenizer=tokenizer, progress=progress)
    return output


@torch.no_grad()
def _answer_argmax(model: nn.Module, batch: TokenBatch, rows_context: Callable[[list[int]], AbstractContextManager] | None = None) -> torch.Tensor:
    with rows_context(list(range(batch.n_rows))) if rows_context is not None else contextlib.nullcontext():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return argmax_ids(logits[batch.label_mask])  # (n_answer_tokens,)


def _answers(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], budgets: Sequence[int]) -> list[str]:
    return [first_line(text) for text in greedy_generate(model, tokenizer, list(prompts), list(budgets))]


def frame_questions(editor: InstructEditor, edits: Sequence[Edit]) -> list[tuple[int, str] | None]:
    """Per edit, (the edit whose question it is, the question) asked in its frame: the next edit's prompt with a single
    answer (of the same task where there is one, ``generation_probes.in_frame_neighbours``) wrapped in this edit's
    instruction; None for a ConvSent edit (no single answer) or where no other edit has one."""
    single = [k for k, edit in enumerate(edits) if edit.task != "convsent"]
    if len(single) < 2:
        return [None] * len(edits)
    nxt = dict(zip(single, (single[j] for j in in_frame_neighbours([edits[k] for k in single]))))
    return [(nxt[k], editor.wrap(edit, edits[nxt[k]].prompt)) if k in nxt else None for k, edit in enumerate(edits)]


def run_demo(editor: InstructEditor, model: nn.Module, tokenizer: PreTrainedTokenizerBase, edits: Sequence[Edit] = DEMO_EDITS,
             probes: Sequence[tuple[str, str]] = LOCALITY_PROBES) -> list[EditOutcome]:
    """Apply each edit alone and ask and score it and the locality probes before and after (single, non-sequential edits).

    Each edit is applied once to read what it adds to the weights, and rolled back; then every prompt is scored
    (teacher-forced) and answered (greedy) before the edits and after each one in ONE batch each, every row with its
    own edit's weight deltas added by hooks (``row_edits``: the same numbers as with the edit written into the
    weights, up to float rounding). An edit held in hooks or added modules is asked during that one application.
    """
    device = next(model.parameters()).device
    probe_batch = Collator(tokenizer, 1024).qa_batch(list(probes), where="locality probes").to(device)
    rows = probe_batch.label_mask.nonzero()[:, 0]
    pre_ids = _answer_argmax(model, probe_batch)
    probe_budgets = [answer_budget(tokenizer, a) for _, a in probes]
    budgets = [answer_budget(tokenizer, edit.target) for edit in edits]
    # what each edit is asked before and after it: the wrapped prompt, the plain one and (a chat template) the chat question
    asks = [list(editor.asked(edit, tokenizer).values()) for edit in edits]
    wrapped = [ask[0] for ask in asks]
    n_ask = len(asks[0])
    # another edit's question in each edit's frame (edit, the other edit, the question, its budget)
    framed = [(k, j, q, in_frame_budget(tokenizer, edits[j].target, edits[k].target))
              for k, f in enumerate(frame_questions(editor, edits)) if f is not None for j, q in [f]]
    framed_of = {k: i for i, (k, *_) in enumerate(framed)}  # edit -> its in-frame question
    deltas: list[dict[str, torch.Tensor] | None] = []
    after, locality, said_after = {}, {}, {}
    for k, edit in enumerate(edits):  # each edit applied once: what it adds to the weights, or (held in hooks) asked now
        with editor.apply(model, [edit], tokenizer) as edited:
            deltas.append(edited.weight_deltas())
            if deltas[-1] is None:
                after[k] = (edited.score(wrapped[k], edit.target), edited.score(edit.prompt, edit.target))
                locality[k] = float(unchanged_tokens(pre_ids, _answer_argmax(model, probe_batch), rows, len(probes)).mean())
                frame = [framed[framed_of[k]]] if k in framed_of else []
                said_after[k] = _answers(model, tokenizer, [*asks[k], *(p for p, _ in probes), *(q for _, _, q, _ in frame)],
                                         [budgets[k]] * n_ask + probe_budgets + [b for *_, b in frame])
    transposed = {name: is_conv1d(model.get_submodule(name.rsplit(".", 1)[0])) for d in deltas if d for name in d}
    hooked = [k for k, d in enumerate(deltas) if d is None]

    def with_edits(owners: list[int | None]) -> Callable[[list[int]], AbstractContextManager]:  # row -> its edit (None: unedited)
        return lambda idx: per_row_updates(model, [None if owners[i] is None else deltas[owners[i]] for i in idx], transposed)

    # teacher-forced: each edit's wrapped and plain prompt before it, then after it (hook-held edits below)
    scored = [k for k in range(len(edits)) if k not in hooked]
    pairs = [(q, edit.target) for edit, w in zip(edits, wrapped) for q in (w, edit.prompt)]
    pairs += [(q, edits[k].target) for k in scored for q in (wrapped[k], edits[k].prompt)]
    scores = score_targets(model, tokenizer, pairs, with_edits([None] * 2 * len(edits) + [k for k in scored for _ in range(2)]))
    before = scores[: 2 * len(edits)]
    after |= dict(zip(scored, zip(scores[2 * len(edits) :: 2], scores[2 * len(edits) + 1 :: 2])))
    post_ids = []
    if scored:
        probes_after = Collator(tokenizer, 1024).qa_batch(list(probes) * len(scored), where="locality probes").to(device)
        post_ids = _answer_argmax(model, probes_after, with_edits([k for k in scored for _ in probes])).split(len(pre_ids))
    locality |= {k: float(unchanged_tokens(pre_ids, ids, rows, len(probes)).mean()) for k, ids in zip(scored, post_ids)}
    # greedy: each edit's prompts and the probes, before and after it (``before_after``: one prefill, the blocks below
    # the edited ones run once; without a split model, every row prefilled with its own edit)
    asked = [(q, b) for k in range(len(edits)) for q, b in (*((q, budgets[k]) for q in asks[k]), *zip((p for p, _ in probes), probe_budgets))]
    owners = [None if k in hooked else k for k in range(len(edits)) for _ in range(n_ask + len(probes))]
    asked += [(q, b) for _, _, q, b in framed]  # then the in-frame questions, each under its frame's edit
    owners += [None if k in hooked else k for k, *_ in framed]
    split = editor.editor.split(model) if hasattr(editor.editor, "split") else None
    if split is not None:
        said_before, (said_edited,) = greedy_before_after(model, tokenizer, split, [q for q, _ in asked], [b for _, b in asked],
                                                          lambda variant, i: None if owners[i] is None else deltas[owners[i]], transposed,
                                                          batch_size=len(asked))
    else:
        said_before = greedy_generate(model, tokenizer, [q for q, _ in asked], [b for _, b in asked], batch_size=len(asked))
        said_edited = greedy_generate(model, tokenizer, [q for q, _ in asked], [b for _, b in asked], batch_size=len(asked),
                                      rows_context=with_edits(owners))
    said_before, said_edited = [first_line(t) for t in said_before], [first_line(t) for t in said_edited]
    width = n_ask + len(probes)
    probe_said = said_before[n_ask:width]
    unedited = [said_before[k * width : k * width + n_ask] for k in range(len(edits))]
    tail = len(edits) * width  # the in-frame questions' answers follow every edit's block
    said_after |= {k: said_edited[k * width : (k + 1) * width] + ([said_edited[tail + framed_of[k]]] if k in framed_of else [])
                   for k in scored}
    outcomes = []
    for k, edit in enumerate(edits):
        (was, plain_was), (now, plain_now), answers = before[2 * k : 2 * k + 2], after[k], said_after[k]
        same = [same_answer(a, b) for a, b in zip(answers[n_ask : width], probe_said)]
        extra = {"chat_said_before": unedited[k][2], "chat_said_after": answers[2], "chat_exact_after": exact_match(answers[2], edit.target)} \
            if n_ask == 3 else {}
        if k in framed_of:
            frame_before, frame_after = said_before[tail + framed_of[k]], answers[width]
            extra |= {"frame_question": edits[framed[framed_of[k]][1]].prompt, "frame_said_before": frame_before,
                     "frame_said_after": frame_after, "frame_kept": float(same_answer(frame_after, frame_before)),
                     "frame_says_target": exact_match(frame_after, edit.target)}
        outcomes.append(EditOutcome(edit, unedited[k][0], answers[0], unedited[k][1], answers[1], exact_match(answers[0], edit.target),
                                    exact_match(answers[1], edit.target), sum(same) / len(same), was.top, now.top,
                                    was.probability, now.probability, was.accuracy, now.accuracy, plain_was.accuracy, plain_now.accuracy,
                                    locality[k], **extra))
    return outcomes


def run_quickstart(model_name: str | None = None, overrides: Sequence[str] = (), budget_steps: int | None = None,
                   output: str | Path | None = None, retrain: bool = False, show_progress: bool = True,
                   edits: Sequence[Edit] = DEMO_EDITS, probes: Sequence[tuple[str, str]] = LOCALITY_PROBES,
                   editor: str | Path | None = None) -> QuickstartResult:
    """Train or reuse the quickstart editor (``output``, default the cache), then run the demo edits on its model;
    ``editor``: a trained editor folder to show instead (nothing is trained; its model unless ``model_name``)."""
    start = time.perf_counter()
    config = quickstart_config(model_name, overrides, budget_steps)
    model = tokenizer = None
    fresh = False  # trained or calibrated now
    if editor is not None:
        from instructedit.editors.learned import read_editor_config

        run_dir = editor_dir = Path(editor)
        name = model_name or read_editor_config(editor_dir).get("model_name") or config.model.name
        config.model = dataclasses.replace(config.model, name=str(name))
        digest = ""
    else:
        run_dir = Path(output) if output is not None else default_run_dir(config)
        editor_dir, model, tokenizer, fresh = prepare_editor(config, run_dir, retrain, show_progress)
        digest = config_hash(config)
    trained = model is not None
    train_s = time.perf_counter() - start
    if model is None or tokenizer is None:
        model, tokenizer = load_model(config.model.name, dtype=config.model.dtype, device=resolve_device(config.training.device, "training.device"))
    wrapper = load_editor(editor_dir, instruction=config.evaluation.instruction, device=next(model.parameters()).device)
    demo_start = time.perf_counter()
    outcomes = run_demo(wrapper, model, tokenizer, edits, probes)
    now = time.perf_counter()
    return QuickstartResult(run_dir, editor_dir, trained, digest, config.model.name, wrapper.instruction, outcomes,
                            train_s, now - demo_start, now - start, calibrated_again=fresh and not trained)


def _clip(text: str, width: int) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _said(before: str, after: str, exact: float | None) -> str:
    """One query's answers before -> after (``shown_change``), marked "(the target)" when the edited model says the target."""
    return shown_change(before, after) + ("   (the target)" if exact else "")


def duration(seconds: float) -> str:
    """Seconds as "4.2s" or "3m05.0s", rounded to tenths first (239.96 s is "4m00.0s", never "3m60.0s")."""
    tenths = round(seconds * 10)
    minutes, rest = divmod(tenths, 600)
    return f"{minutes}m{rest / 10:04.1f}s" if minutes else f"{rest / 10:.1f}s"


def _p(value: float) -> str:
    return f"{value:.3f}" if value >= 5e-4 else f"{value:.0e}"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    rows = [header, *rows]
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    table.insert(1, "  ".join("-" * w for w in widths))
    return table


def format_report(result: QuickstartResult) -> str:
    """What the model says before and after each edit (the headline), then the teacher-forced scores, as plain text."""
    how = (f"trained now in {duration(result.train_s)}" if result.trained else
           f"reused from the cache, calibrated again in {duration(result.train_s)}" if result.calibrated_again else
           "reused from the cache" if result.config_hash else "given with --editor")
    wrap = f"seen description #{result.instruction}" if result.instruction is not None else "none"
    chat = all(o.chat_exact_after is not None for o in result.outcomes)  # the model has a chat template
    said: list[str] = []
    for i, o in enumerate(result.outcomes, start=1):  # one block per edit: the answers in full, however long
        said += [f"{i}. [{o.edit.task}] {o.edit.prompt} -> {o.edit.target}",
                 f"     instruction-wrapped prompt:  {_said(o.said_before, o.said_after, o.exact_after)}",
                 f"     plain prompt:                {_said(o.plain_said_before, o.plain_said_after, o.plain_exact_after)}",
                 *([f"     chat question (user turn):   {_said(o.chat_said_before, o.chat_said_after, o.chat_exact_after)}"]
                   if chat else []),
                 *([f"     in this frame, {shown(o.frame_question)}:  {_said(o.frame_said_before, o.frame_said_after, None)}"
                    + ("   (this edit's target)" if o.frame_says_target else "")] if o.frame_question else []), ""]
    forced = _table(("#", "top-1 before -> after", "p(target) before -> after", "accuracy before -> after", "locality"),
                    [(str(i), _clip(f"{shown(o.top_before)} -> {shown(o.top_after)}", 28), f"{_p(o.p_before)} -> {_p(o.p_after)}",
                      f"{o.acc_before:.2f} -> {o.acc_after:.2f}", f"{o.locality:.2f}") for i, o in enumerate(result.outcomes, start=1)])
    m = result.mean
    lines = [
        f"InstructEdit quickstart: editor {result.editor_dir} ({how})",
        f"model {result.model_name}; instruction: {wrap}; each edit applied alone and rolled back",
        "", "What the model says before -> after each edit (greedy decoding, first line):", "", *said,
        f"says the target (exact match), wrapped prompt: {m('exact_after'):.2f}   plain prompt: {m('plain_exact_after'):.2f}"
        + (f"   chat question: {m('chat_exact_after'):.2f}" if chat else ""),
        f"unrelated prompts whose answer is unchanged (generation locality): {m('gen_locality'):.2f}",
        *([f"another edit's question asked in the edit's frame (\"in this frame\"): answer unchanged {m('frame_kept'):.2f}, "
           f"says the edit's target {m('frame_says_target'):.2f}"] if any(o.frame_question for o in result.outcomes) else []),
        "", "Teacher-forced scores (the target fed in; the paper's protocol):", "", *forced, "",
        f"reliability (target token accuracy, wrapped prompt): {m('acc_before'):.2f} -> {m('acc_after'):.2f}",
        f"reliability on the plain prompt (no instruction):     {m('plain_acc_before'):.2f} -> {m('plain_acc_after'):.2f}",
        f"target probability (mean):                           {_p(m('p_before'))} -> {_p(m('p_after'))}",
        f"locality (unchanged answer tokens, unrelated prompts): {m('locality'):.2f}",
        f"time: editor {duration(result.train_s)}, demo {duration(result.demo_s)}, total {duration(result.total_s)}",
    ]
    return "\n".join(lines)
