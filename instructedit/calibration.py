"""Calibrating a trained editor for generation (``instructedit calibrate``, and the quickstart's calibration).

The meta-objective is teacher-forced; the step sizes α it learns can leave an edit too weak to win
the first answer token when the edited model decodes by itself, or (multiplied too far) strong
enough to leak into unrelated answers. ``calibrate`` tries a few multipliers of α on the run's
validation records (never the test split), keeps the one with the highest generation reliability
whose generation locality is at or above the floor, and writes the editor with α × that multiplier;
a least-squares editor can also be given a preservation sample (see ``commands/calibrate.py``).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from instructedit.io import read_json, write_json
from instructedit.records import EditRecord
from instructedit.runs import CONFIG, EDITOR_CONFIG, editor_sha256

PARTIAL = ".partial.json"  # beside the output folder: the grid's finished cells while a calibration runs


def preservation_texts(records: list[EditRecord], count: int, where: str) -> list[tuple[str, str]]:
    """The (prompt, answer) pairs of the locality prompts of the first ``count`` of ``records`` that have one (``where``
    names them in an error)."""
    from instructedit.analysis.many_edits import locality_texts

    texts = locality_texts([r for r in records if r.locality][:count])
    if not texts:
        raise ValueError(f"{where}: no record has a locality prompt to preserve")
    return texts


def in_frame_texts(records: list[EditRecord], instructions: list[int | None], collator: Any, count: int, measured: set[str],
                   where: str) -> list[tuple[str, str]]:
    """The in-frame preservation sample's (prompt, answer) pairs: the questions of the first ``count`` single-answer records
    whose question the calibration does not ask (``measured``), each in every edit form of ``collator`` (the wrapped one in
    the record's instruction), as the editor's users ask them; ``where`` names the records in an error."""
    chosen = [(r, i) for r, i in zip(records, instructions, strict=True) if r.convsent is None and r.prompt not in measured][:count]
    if not chosen:
        raise ValueError(f"{where}: no single-answer record whose question the calibration does not ask itself")
    return list(dict.fromkeys((collator.form_prompt(r, form, i), r.target_new) for r, i in chosen for form in collator.edit_forms))


IN_FRAME_TRAIN = "train"  # --in-frame-data: the run's training split
IN_FRAME_WEIGHT = 500.0  # the in-frame sample's weight, in tokens (results/analysis/in-frame-locality/)


def in_frame_sources(data: str | Sequence[str] | None) -> list[str]:
    """``--in-frame-data``: "train" (the run's training split, the default) and/or data files, comma-separated or a list."""
    names = [IN_FRAME_TRAIN] if data is None else [n.strip() for n in (data.split(",") if isinstance(data, str) else data) if n.strip()]
    if not names:
        raise ValueError("--in-frame-data: name the run's training split (train) or data files")
    return list(dict.fromkeys(names))


Grid = dict[int, dict[float | None, dict[float, dict[str, Any]]]]  # rounds -> preservation weight (None: none) -> multiplier -> scores


def one_round_scale(grid: Grid, rounds: int, weight: float | None, chosen: float, locality_floor: float, in_frame_floor: float = 0.0) -> float:
    """The step sizes of many edits (in one call or one after another) relative to the ``chosen`` multiplier (``queries.many_edit_scale``): where
    ``rounds`` > 1 won and one round was tried, the one-round choice at the same ``weight`` (``choose_scale``) over
    ``chosen``; else 1."""
    from instructedit.evaluation.generation_check import choose_scale

    if rounds == 1 or 1 not in grid or weight not in grid[1]:
        return 1.0
    return choose_scale(grid[1][weight], locality_floor, in_frame_floor) / chosen


Cell = tuple[int, float | None, float]  # (rounds, preservation weight, multiplier)


def near_floor(cells: dict[Cell, dict[str, Any]], chosen: Cell, locality_floor: float, in_frame_floor: float = 0.0) -> list[Cell]:
    """The cells that said more than ``chosen`` and missed the locality floor by at most one validation case's share
    (1 / ``gen_n``), at or above the in-frame floor: a choice one case could turn (``calibrate`` names them, most said first)."""
    said = cells[chosen]["gen_reliability"]
    near = [k for k, v in cells.items() if v.get("gen_n") and v["gen_reliability"] > said
            and locality_floor - 1 / v["gen_n"] <= v["gen_locality"] < locality_floor and v.get("gen_locality_in_frame", 1.0) >= in_frame_floor]
    return sorted(near, key=lambda k: -cells[k]["gen_reliability"])


def calibrate(run: str | Path, output: str | Path, scales: Sequence[float], *, checkpoint: str = "best", locality_floor: float = 0.9,
              val_size: int | None = None, preserve: int | None = None, preserve_weights: Sequence[float] = (1000.0,),
              preserve_data: str | Path | None = None, edit_forms: str | Sequence[str] | None = None, device: str = "auto",
              val_data: str | Path | None = None, answer_stop: str | None = None, model: Any = None, tokenizer: Any = None,
              progress: bool = True, rounds: Sequence[int] = (1,), restart: bool = False, in_frame_floor: float = 0.0,
              in_frame: int | None = None, in_frame_weight: float = IN_FRAME_WEIGHT, in_frame_data: str | Sequence[str] | None = None) -> None:
    """Write ``run``'s ``checkpoint`` editor with its step sizes × the best of ``scales`` (and, with ``preserve`` records, a
    preservation sample at the best of ``preserve_weights``) to ``output``, a new folder; prints every result.

    The multipliers are tried on the first ``val_size`` records of the run's validation split, or of ``val_data`` (any
    file the loaders read: facts worded as the editor's users will ask them, never the file it is evaluated on), whose
    prompts are wrapped in the first seen description of their task, as ``evaluate`` wraps them.

    ``answer_stop``: what each edit input's answer ends with (``config.ANSWER_STOPS``; default: the run's), saved with the
    calibrated editor like ``edit_forms``.

    ``rounds``: the rounds a single edit is made in, each tried with every multiplier (and weight): a later round is
    made on the model the earlier ones edited, from the gradient left (``LearnedEditor.apply``). The chosen number is
    saved as ``queries.edit_rounds``: ``apply`` (``rounds="auto"``), ``edit`` and ``evaluate`` make the editor's edits so.
    Where more than one round is chosen and one round was tried, the one-round choice (at the chosen weight) over the
    chosen multiplier is saved as ``queries.many_edit_scale``: a call of more than 16 edits makes rounds of its own
    (``editors.learned.schedule_for``, a rule fitted with one-round step sizes) and edits kept one after another are made
    in one round each, so both are made at the one-round step sizes.

    Every cell also measures in-frame locality (``generation_scores(in_frame=True)``: another validation record's question
    asked in the edit's forms and frame keeps its answer); ``in_frame_floor`` is the lowest accepted, as ``locality_floor``
    is for the raw locality prompts (default 0: measured and reported only). ``in_frame`` records: the preservation sample
    (which it needs) also holds still the keys of the questions of that many records asked in the editor's edit forms
    (``in_frame_texts``), continued with what the unedited model says to them, counted as ``in_frame_weight`` tokens at
    every preservation weight: of each of ``in_frame_data`` (``in_frame_sources``: the run's training split, "train", by
    default; data files), never the questions the calibration asks (results/analysis/in-frame-locality/).

    ``model``/``tokenizer``: the run's base model already loaded (the quickstart's trainer's), else it is loaded.
    ``progress``: a progress bar while each multiplier's answers are decoded.

    Each finished (rounds, weight) cell of the grid is kept in ``OUTPUT.partial.json`` until the editor is written: a rerun
    of the same calibration (``PartialGrid``: the same editor, multipliers, records, forms, sample and model) takes those
    cells from it instead of scoring them again
    (``restart``: scores them all again)."""
    from instructedit.editors.mend import MENDEditor
    from instructedit.evaluation.generation_check import floors_missed, selection_score
    from instructedit.models.loading import load_model, resolve_device
    from instructedit.tasks.prepare import prepare_data

    rounds = _checked_grid_arguments(locality_floor, in_frame_floor, in_frame, preserve, in_frame_weight, rounds)
    run, output = Path(run), Path(output)
    source = run / checkpoint
    config = _calibration_config(run, source, checkpoint, output, edit_forms, answer_stop, val_size)
    if model is None or tokenizer is None:
        model, tokenizer = load_model(config.model.name, dtype=config.model.dtype, device=resolve_device(device))
    device = next(model.parameters()).device
    data = prepare_data(config, tokenizer)
    editor = MENDEditor.from_pretrained(source, device=device).eval()
    seen = data.pool.evaluation_index("seen") if data.pool is not None else None  # a file's records: as evaluate asks them
    records, instructions, described = _calibration_records(data, config, val_data, seen)
    sample = None
    if preserve is not None:
        sample = _preservation_sample(editor, model, data, config, run, records, seen, preserve, preserve_data,
                                      preserve_weights[0], in_frame, in_frame_weight, in_frame_data)
        print(f"preservation sample: {editor.preservation_source}")
    partial = PartialGrid(output.with_name(output.name + PARTIAL), {
        "editor_sha256": editor_sha256(source), "scales": list(scales), "records": described, "sources": [r.source for r in records],
        "edit_forms": list(data.collator.edit_forms), "answer_stop": data.collator.answer_stop,
        "preservation": editor.preservation_source if preserve is not None else None,
        "model": config.model.name, "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "device": device.type})
    weights = list(preserve_weights) if sample is not None else [None]
    grid = _score_grid(model, tokenizer, editor, data.collator, records, instructions, scales, rounds, weights, sample, partial,
                       restart, progress)
    cells = {(r, w, sc): v for r, per_weight in grid.items() for w, per in per_weight.items() for sc, v in per.items()}
    # the selection rule of training validation; on a tie fewer rounds, then the smaller multiplier, then the larger
    # preservation weight
    chosen_cell = max(cells, key=lambda k: (selection_score(cells[k], locality_floor, in_frame_floor), -k[0], -k[2], k[1] or 0))
    chosen_rounds, chosen_weight, chosen = chosen_cell
    many_edit_scale = one_round_scale(grid, chosen_rounds, chosen_weight, chosen, locality_floor, in_frame_floor)
    missed = near_floor(cells, chosen_cell, locality_floor, in_frame_floor)
    short = floors_missed(cells[chosen_cell], locality_floor, in_frame_floor)
    if sample is not None:
        sample.weigh(chosen_weight)
    extra = _saved_config(source, editor, data.collator, grid, cells, chosen_cell, many_edit_scale, missed, short, described,
                          locality_floor, in_frame_floor,
                          None if in_frame is None else {"records": in_frame, "weight": in_frame_weight, "data": in_frame_sources(in_frame_data)})
    _write_editor(editor, source, output, chosen, extra, [r.subject for r in data.train])
    partial.path.unlink(missing_ok=True)
    for cell, v in cells.items():
        print(_cell_line(cell, v, len(rounds) > 1, cell == chosen_cell))
    many = extra["queries"]["many_edit_forms"]
    many_forms = f"; many edits made in {' + '.join(many)}" if many != list(data.collator.edit_forms) else ""
    print(f"wrote {output} (step sizes × {chosen:g}{'' if chosen_weight is None else f', preservation weight {chosen_weight:g}'}"
          f"{f', edits made in {chosen_rounds} rounds' if chosen_rounds != 1 else ''}"
          f"{f'; many edits (more than 16 in one call, or one after another) at step sizes × {chosen * many_edit_scale:g}, the one-round choice' if many_edit_scale != 1 else ''}"
          f"{many_forms})")
    if short:  # no cell met every floor: the choice is the cell least short of them, not one that meets them
        print(floors_warning(short))
    for r, w, sc in missed:  # one validation case from another choice
        v = cells[r, w, sc]
        print(f"note: {r} round{'s' if r != 1 else ''}{'' if w is None else f', preservation weight {w:g}'}, α × {sc:g} said more "
              f"({v['gen_reliability']:.3f} against {cells[chosen_cell]['gen_reliability']:.3f}) and kept "
              f"{v['gen_locality']:.3f}, within one of {v['gen_n']} validation cases of the {locality_floor:g} floor: another run "
              f"of the same recipe may choose it; --locality-floor {math.floor(v['gen_locality'] * 100) / 100:g} would admit it")


def _checked_grid_arguments(locality_floor: float, in_frame_floor: float, in_frame: int | None, preserve: int | None,
                            in_frame_weight: float, rounds: Sequence[int]) -> list[int]:
    """``calibrate``'s floors and in-frame sample checked; its ``rounds``, each checked, sorted and without repeats."""
    from instructedit.editors.learned import check_edit_rounds

    if not 0 <= locality_floor <= 1:
        raise ValueError(f"--locality-floor must be in [0, 1], got {locality_floor}")
    if not 0 <= in_frame_floor <= 1:
        raise ValueError(f"--in-frame-floor must be in [0, 1], got {in_frame_floor}")
    if in_frame is not None and (preserve is None or in_frame < 1 or in_frame_weight <= 0):
        raise ValueError("--in-frame-preserve N (>= 1) joins the preservation sample: it needs --preserve (or --preserve-data) and "
                         f"a positive --in-frame-weight, got N={in_frame}, weight {in_frame_weight:g}")
    checked = sorted({check_edit_rounds(r, "--rounds") for r in rounds})
    if not checked:
        raise ValueError("--rounds: give at least one number of rounds")
    return checked


def _calibration_config(run: Path, source: Path, checkpoint: str, output: Path, edit_forms: str | Sequence[str] | None,
                        answer_stop: str | None, val_size: int | None) -> Any:
    """The run's config with ``calibrate``'s edit forms, answer stop and validation size in it; the run folder and a new
    ``output`` checked."""
    import dataclasses

    from instructedit.config import check_edit_forms, load_config

    if not (run / CONFIG).is_file() or not (source / EDITOR_CONFIG).is_file():
        raise FileNotFoundError(f"--run {run}: needs {CONFIG} and {checkpoint}/{EDITOR_CONFIG} (a training run folder)")
    if output.exists() and any(output.iterdir()):
        raise ValueError(f"--output {output} exists and is not empty; choose a new folder")
    config = load_config(run / CONFIG)
    training: dict[str, Any] = {}
    if edit_forms is not None:
        training["edit_forms"] = list(check_edit_forms(edit_forms, "--edit-forms"))
    if answer_stop is not None:  # TrainingConfig checks the value
        training["answer_stop"] = answer_stop
    if val_size is not None:
        if val_size < 1:
            raise ValueError(f"--val-size must be >= 1, got {val_size}")
        training["val_size"] = val_size
    return dataclasses.replace(config, training=dataclasses.replace(config.training, **training)) if training else config


def _calibration_records(data: Any, config: Any, val_data: str | Path | None, seen: int | None) -> tuple[list[EditRecord], list[int | None], str]:
    """The records the multipliers are tried on (the run's validation split, or the first single-answer records with a
    locality prompt of ``val_data``), the instruction each is asked in, and what they are, in words."""
    from instructedit.tasks.loaders import load_records

    if val_data is None:
        records = data.val
        return records, data.instructions(records, config.data.instruction_seed), f"the first {config.training.val_size} records of the run's validation split"
    loaded = [r for r in load_records(Path(val_data)).records if r.convsent is None and r.locality]
    records = loaded[: config.training.val_size]  # --val-size already set it
    if not records:
        raise ValueError(f"--val-data {val_data}: no record with a single answer and a locality prompt to calibrate on")
    return records, [seen] * len(records), f"the first {len(records)} records with a locality prompt of {val_data}"


class _Sample:
    """A calibration's preservation sample, set on the editor (``MENDEditor.set_preservation``): ``memory`` holds the raw
    sample's covariance ``own``, plus, with an in-frame sample (``framed``), that one at its own weight in tokens."""

    def __init__(self, memory: Any, framed: Any, in_frame_weight: float) -> None:
        self.memory, self.own, self.framed, self.in_frame_weight = memory, memory.text, framed, in_frame_weight

    def weigh(self, weight: float) -> None:
        """Count the sample as ``weight`` tokens. The covariance is the sample's; the weight only scales it. The in-frame
        sample keeps its own: w·C + w_frame·C_frame = w·(C + w_frame/w·C_frame)."""
        from instructedit.editors.aggregation import with_sample

        self.memory.text_weight = weight
        if self.framed is not None:
            self.memory.text = with_sample(self.own, weight, self.framed.text, self.in_frame_weight)


def _preservation_sample(editor: Any, model: Any, data: Any, config: Any, run: Path, records: list[EditRecord], seen: int | None,
                         preserve: int, preserve_data: str | Path | None, weight: float, in_frame: int | None,
                         in_frame_weight: float, in_frame_data: str | Sequence[str] | None) -> _Sample:
    """The preservation sample ``calibrate --preserve`` gives ``editor`` at ``weight``: the locality prompts + answers of
    ``preserve`` records of the training split (or of ``preserve_data``), without those of the calibration's ``records``;
    with ``in_frame`` records, their questions asked in the edit forms (``in_frame_texts``) too."""
    from instructedit.analysis.many_edits import key_memory, locality_texts, without_measured
    from instructedit.tasks.loaders import load_records

    if preserve_data is not None:
        where = f"--preserve-data {preserve_data}"
        texts = preservation_texts(load_records(Path(preserve_data)).records, preserve, where)
    else:
        where = f"the training split of {run} ({', '.join(config.data.tasks)}, split seed {config.data.split_seed})"
        texts = preservation_texts(data.train, preserve, where)
    # the validation records' own locality prompts are what the calibration measures: holding them still would flatter it
    sampled = len(texts)
    texts = without_measured(texts, set(locality_texts(records)), where, "the calibration")
    memory = key_memory(editor, model, data.collator, texts, past_weight=0.0, text_weight=weight)
    left_out = f", without the {sampled - len(texts)} the calibration measures" if len(texts) < sampled else ""
    source_text = (f"the locality prompts + answers of the first {preserve} records with one of {where} "
                   f"({len(texts)} texts{left_out}, {memory.text_tokens} tokens)")
    framed = None
    if in_frame is not None:
        frame_texts, wheres = [], []
        for name in in_frame_sources(in_frame_data):
            if name == IN_FRAME_TRAIN:
                frame_records, where_from = data.train, f"the training split of {run}"
                frame_instructions = data.instructions(frame_records, config.data.instruction_seed)
            else:  # a file's questions in the first seen description of their task, as evaluate asks them
                frame_records, where_from = load_records(Path(name)).records, name
                frame_instructions = [seen] * len(frame_records)
            # the calibration asks its records' questions in frame: holding them still would flatter it
            frame_texts += in_frame_texts(frame_records, frame_instructions, data.collator, in_frame, {r.prompt for r in records},
                                          f"--in-frame-data {name}")
            wheres.append(where_from)
        frame_texts = list(dict.fromkeys(frame_texts))
        framed = key_memory(editor, model, data.collator, frame_texts, 0.0, 1.0, answers="model", keys="all")
        memory.text_tokens += framed.text_tokens
        source_text += (f" + the questions of the first {in_frame} single-answer records of {' and of '.join(wheres)} not asked by "
                        f"the calibration, in the edit forms ({len(frame_texts)} texts, {framed.text_tokens} tokens, continued "
                        f"with the unedited model's answers), counted as {in_frame_weight:g} tokens")
    editor.set_preservation(memory, source_text, texts)
    return _Sample(memory, framed, in_frame_weight)


def _score_grid(model: Any, tokenizer: Any, editor: Any, collator: Any, records: list[EditRecord], instructions: list[int | None],
                scales: Sequence[float], rounds: list[int], weights: list[float | None], sample: _Sample | None,
                partial: PartialGrid, restart: bool, progress: bool) -> Grid:
    """Every (rounds, weight) cell's scores at every multiplier (``generation_scores``, in-frame locality too), each cell
    saved in ``partial`` once scored; cells an interrupted run of the same calibration saved are taken from it."""
    from instructedit.editors.learned import undone_rounds_counted
    from instructedit.evaluation.generation_check import generation_scores

    kept = partial.resume(restart)
    grid: Grid = {r: {} for r in rounds}
    for weight in weights:
        if weight is not None and sample is not None:
            sample.weigh(weight)
            print(f"preservation weight {weight:g}:")
        for r in rounds:
            if len(rounds) > 1:
                print(f"edits made in {r} round{'s' if r != 1 else ''}:")
            if (r, weight) in kept:
                grid[r][weight] = kept[r, weight]
                print(f"  scored before the run was interrupted: kept from {partial.path}")
                continue
            with undone_rounds_counted() as undone:
                grid[r][weight] = generation_scores(model, tokenizer, editor, collator, records, instructions, scales,
                                                    progress=progress, intervals=True, rounds=r, in_frame=True)
            if undone.edits:
                print(f"  {undone}")
            partial.save(kept | {(rr, w): per for rr, per_weight in grid.items() for w, per in per_weight.items()})
    return grid


def _saved_config(source: Path, editor: Any, collator: Any, grid: Grid, cells: dict[Cell, dict[str, Any]], chosen_cell: Cell,
                  many_edit_scale: float, missed: list[Cell], short: dict, described: str, locality_floor: float,
                  in_frame_floor: float, in_frame: dict[str, Any] | None) -> dict[str, Any]:
    """What the calibrated editor's ``editor_config.json`` carries beyond the editor's own config: the source's other keys,
    ``queries`` (how its edits are made) and ``calibration`` (the whole grid and the choice; also ``calibration.json``)."""
    from instructedit.api import query_setup
    from instructedit.config import many_edit_forms

    chosen_rounds, chosen_weight, chosen = chosen_cell
    saved = json.loads((source / EDITOR_CONFIG).read_text())
    extra = {k: v for k, v in saved.items() if k not in editor.editor_config()}
    extra["queries"] = {**(extra.get("queries") or query_setup(source)), "edit_forms": list(collator.edit_forms),
                        "answer_stop": collator.answer_stop, "edit_rounds": chosen_rounds,  # how its edits are made
                        "many_edit_scale": many_edit_scale, "many_edit_forms": list(many_edit_forms(collator.edit_forms))}
    extra["calibration"] = {"source": str(source), "scales": {f"{s:g}": v for s, v in grid[chosen_rounds][chosen_weight].items()},
                            "chosen": chosen, "rounds": chosen_rounds, "many_edit_scale": many_edit_scale,
                            "rounds_tried": {str(r): {"none" if w is None else f"{w:g}": {f"{sc:g}": v for sc, v in per.items()}
                                                      for w, per in per_weight.items()} for r, per_weight in grid.items()},
                            "locality_floor": locality_floor, "in_frame_floor": in_frame_floor, "floors_met": not short,
                            "near_floor": [{"rounds": r, "weight": w, "scale": sc, **{k: cells[r, w, sc][k] for k in ("gen_reliability", "gen_locality")}}
                                           for r, w, sc in missed],
                            "edit_forms": list(collator.edit_forms),
                            "answer_stop": collator.answer_stop, "records": described,
                            "preservation": None if editor.preservation is None else
                            {"weight": editor.preservation.text_weight, "source": editor.preservation_source,
                             "weights_tried": {f"{w:g}": {f"{sc:g}": v for sc, v in per.items()}
                                               for w, per in grid[chosen_rounds].items()},
                             "in_frame": in_frame}}
    return extra


def _write_editor(editor: Any, source: Path, output: Path, chosen: float, extra: dict[str, Any], subjects: Sequence[str]) -> None:
    """Write ``editor`` at step sizes × ``chosen`` with ``extra`` (and ``calibration.json``, the source's card, training
    config and instruction pool, and ``subjects``, the training split's entities that ``apply(neighbours=...)`` swaps in)
    to ``output``, atomically: into a temporary folder, then renamed."""
    from instructedit.editors.base import scaled_step_sizes
    from instructedit.editors.card import POOL_COPY
    from instructedit.editors.neighbours import save_subjects

    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with scaled_step_sizes(editor, chosen):
        editor.save_pretrained(tmp, extra=extra)
    save_subjects(tmp, subjects)
    for name in ("README.md", "training_config.yaml", POOL_COPY):
        if (source / name).is_file():
            shutil.copy2(source / name, tmp / name)
    write_json(tmp / "calibration.json", extra["calibration"])
    output.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(output, ignore_errors=True)
    tmp.rename(output)


def _cell_line(cell: Cell, v: dict[str, Any], several_rounds: bool, chosen: bool) -> str:
    """One cell of the grid, as ``calibrate`` prints it once the editor is written."""
    r, w, sc = cell
    weight = "" if w is None else f"preservation weight {w:g}, "
    made = f"{r} rounds, " if several_rounds or r != 1 else ""
    forms = "".join(f", {k[len('gen_reliability_'):]} {_rate(v, k)}" for k in v if k.startswith("gen_reliability_"))
    framed_rate = (f", in the edit's frame {_rate(v, 'gen_locality_in_frame')} (saying the target {_rate(v, 'gen_in_frame_target')})"
                   if "gen_locality_in_frame" in v else "")
    return (f"{made}{weight}α × {sc:g}: generation reliability {_rate(v, 'gen_reliability')}{forms}, generation locality "
            f"{_rate(v, 'gen_locality')}{framed_rate} (n={v.get('gen_n', 0)}; 95 % bootstrap intervals){'  <- chosen' if chosen else ''}")


def floors_warning(short: dict[str, tuple[float, float]]) -> str:
    """What ``calibrate`` prints when the chosen cell misses a floor (``floors_missed``): no cell met them all."""
    names = {"gen_locality": "generation locality", "gen_locality_in_frame": "in-frame locality"}
    missed = ", ".join(f"{names[name]} {rate:.3f} < {floor:g}" for name, (rate, floor) in short.items())
    return (f"warning: no cell met every floor; the chosen one is the least short of them ({missed}). Try smaller multipliers "
            "(--scales), fewer rounds or a heavier preservation sample, or lower the floor.")


class PartialGrid:
    """The finished cells of a calibration's grid, ``{(rounds, weight): {multiplier: scores}}``, kept in ``path`` (rewritten
    atomically after each cell) with the identity of the calibration that scored them; ``resume`` hands them to a rerun of
    the same calibration, and refuses a file of another one (another editor, multipliers, records, forms, sample or model)."""

    def __init__(self, path: Path, identity: dict[str, Any]) -> None:
        self.path, self.identity = path, json.loads(json.dumps(identity))

    def resume(self, restart: bool = False) -> dict[tuple[int, float | None], dict[float, dict]]:
        if restart or not self.path.is_file():
            return {}
        try:
            saved = read_json(self.path)
            theirs = saved["partial_calibration"]
            cells = {(int(c["rounds"]), c["weight"]): {float(k): v for k, v in c["scales"].items()} for c in saved["cells"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{self.path} is not a partial calibration ({type(e).__name__}: {e}); move it away or pass --restart") from None
        differ = [k for k in sorted(set(theirs) | set(self.identity)) if theirs.get(k) != self.identity.get(k)]
        if differ:
            raise ValueError(f"{self.path} holds the cells of an interrupted calibration with different {', '.join(differ)}; "
                             "pass --restart to score them again, or choose another --output")
        if cells:
            print(f"resuming an interrupted calibration: {len(cells)} cell{'s' if len(cells) != 1 else ''} of its grid kept in {self.path}")
        return cells

    def save(self, cells: dict[tuple[int, float | None], dict[float, dict]]) -> None:
        write_json(self.path, {"partial_calibration": self.identity, "cells": [
            {"rounds": r, "weight": w, "scales": {repr(sc): v for sc, v in per.items()}} for (r, w), per in cells.items()]})


def _rate(scores: dict, key: str) -> str:
    """``scores[key]`` with its interval (``generation_scores(intervals=True)``'s ``ci``) where it has one."""
    low_high = f" [{scores['ci'][key][0]:.3f}, {scores['ci'][key][1]:.3f}]" if key in scores.get("ci", {}) else ""
    return f"{scores.get(key, 0):.3f}{low_high}"
