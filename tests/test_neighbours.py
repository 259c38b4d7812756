"""Same-relation neighbours held still at edit time (``editors/neighbours.py``, ``InstructEditor.apply(neighbours=...)``,
``edit --neighbours``), on a tiny random LLaMA reloaded through ``from_pretrained``."""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Callable, Sequence

import pytest
import torch

from instructedit.models.loading import load_model, max_input_length
from instructedit.tasks.collate import Collator

POOL = ("Italy", "Spain", "Norway", "Peru", "Chile", "Japan", "Kenya", "Egypt", "Canada", "Brazil")
SAMPLE = [("The capital of Sweden is", " Stockholm"), ("Water boils at", " one hundred degrees"), ("The sky is", " blue")]


def test_swapped_questions_draw_other_entities_by_the_prompt(tmp_path: Path) -> None:
    """The neighbours: the edit's question with its subject swapped for pool entities that neither are it nor appear in the
    question, the same draw for the same prompt and seed in any call; what cannot be drawn fails with what is missing."""
    from instructedit.editors.neighbours import Neighbours, load_subjects, read_subjects, save_subjects, subject_pool, swapped_questions

    pool = [*POOL, "France", "The capital", " Italy ", ""]
    drawn = swapped_questions("The capital of France is", "France", pool, 4, seed=0)
    assert len(set(drawn)) == 4 and all(q.startswith("The capital of ") and q.endswith(" is") for q in drawn)
    assert {q.removeprefix("The capital of ").removesuffix(" is") for q in drawn} <= set(POOL)
    assert swapped_questions("The capital of France is", "France", pool, 4, seed=0) == drawn  # a fixed draw per prompt
    assert swapped_questions("The capital of France is", "France", pool, 4, seed=1) != drawn
    for prompt, subject, count, message in (("The capital of France is", "", 2, "has no subject"),
                                            ("The capital of France is", "Germany", 2, "does not name 'Germany'"),
                                            ("The capital of France is", "France", 11, "has only 10 other entities")):
        with pytest.raises(ValueError, match=message):
            swapped_questions(prompt, subject, pool, count)
    assert subject_pool(pool) == (*POOL, "France", "The capital")  # stripped, distinct, in order
    with pytest.raises(ValueError, match="count must be a whole number"):
        Neighbours(count=0)
    with pytest.raises(ValueError, match="weight must be > 0"):
        Neighbours(weight=0.0)
    with pytest.raises(ValueError, match="not one string"):
        Neighbours(subjects="France")  # type: ignore[arg-type]

    assert load_subjects(tmp_path) is None
    save_subjects(tmp_path, pool)
    assert load_subjects(tmp_path) == subject_pool(pool)
    (tmp_path / "subjects.json").write_text(json.dumps(["France"]))
    with pytest.raises(ValueError, match="subjects.json: expected"):
        load_subjects(tmp_path)
    # a pool from a text file (one entity a line) or an edit data file's subjects
    (tmp_path / "pool.txt").write_text("Italy\n\nSpain\nItaly\n")
    assert read_subjects(tmp_path / "pool.txt") == ("Italy", "Spain")
    rows = [{"subject": s, "src": f"What is the capital of {s}?", "alt": "Rome", "answers": ["x"], "rephrase": f"Capital of {s}?",
             "loc": "nq question: who wrote it?", "loc_ans": "someone"} for s in ("Peru", "Chile")]
    (tmp_path / "zsre.json").write_text(json.dumps(rows))
    assert read_subjects(tmp_path / "zsre.json") == ("Peru", "Chile")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty.txt: no entity names"):
        read_subjects(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt: no such file"):
        read_subjects(tmp_path / "missing.txt")


def _editor_with_sample(model_dir: Path, out: Path, save_tiny_editor: Callable[..., Path]) -> Path:
    """A tiny least-squares editor (identity network, descending) holding a preservation sample of its own at 50 tokens,
    as ``calibrate --preserve`` saves one (with its texts), and the subject pool ``POOL``."""
    from instructedit.analysis.many_edits import key_memory
    from instructedit.editors.mend import MENDEditor
    from instructedit.editors.neighbours import save_subjects

    folder = save_tiny_editor(model_dir, out, -5.0, ["editor.aggregation=least_squares"])
    model, tok = load_model(str(model_dir))
    editor = MENDEditor.from_pretrained(folder).eval()
    editor.set_preservation(key_memory(editor, model, Collator(tok, 64), SAMPLE, past_weight=0.0, text_weight=50.0), "three pairs",
                            SAMPLE)
    editor.save_pretrained(folder)
    save_subjects(folder, POOL)
    return folder


def test_apply_with_neighbours_holds_their_answers_beside_the_editors_sample(tiny_llama_dir: Path, tmp_path: Path,
                                                                          save_tiny_editor: Callable[..., Path]) -> None:
    """apply(neighbours=...): the neighbours, wrapped in the edit's frame and continued with the unedited model's answers,
    join the editor's own sample in the solves (the same weights as the explicit memory), in twice the calibrated rounds;
    a heavy weight moves the model's next-token distribution after them far less than the edit alone; the model comes
    back bit for bit; and what the call cannot do is refused before anything is edited."""
    from instructedit.analysis.many_edits import key_memory
    from instructedit.api import Edit, load_editor
    from instructedit.editors.aggregation import KeyMemory, with_sample
    from instructedit.editors.neighbours import Neighbours, swapped_questions

    folder = _editor_with_sample(tiny_llama_dir, tmp_path / "ls", save_tiny_editor)
    loaded = load_editor(folder)
    assert loaded.subjects == POOL and loaded.edit_rounds == 1
    model, tok = load_model(str(tiny_llama_dir))
    editor = loaded.editor_for(model, tok)
    edit = Edit(prompt="The capital of France is", target="Rome", subject="France")
    held = [loaded.wrap(edit, q) for q in swapped_questions(edit.prompt, "France", POOL, 4)]
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def next_tokens(m: torch.nn.Module) -> torch.Tensor:  # the next-token distribution after each neighbour
        with torch.no_grad():
            return torch.stack([m(**tok(q, return_tensors="pt")).logits[0, -1].log_softmax(-1) for q in held])

    unedited = next_tokens(model)

    def edited(**options) -> tuple[dict[str, torch.Tensor], float, dict]:
        with loaded.apply(model, [edit], tok, **options) as made:
            state = {k: v.clone() for k, v in model.state_dict().items()}
            moved = float((next_tokens(model).exp() - unedited.exp()).abs().sum(-1).mean())  # total variation x 2
            how = made.how
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # rolled back bit for bit
        return state, moved, how

    alone, moved_alone, _ = edited(rounds=2)
    near, moved_near, how = edited(neighbours=Neighbours(count=4, weight=1e6))
    assert how["rounds"] == 2 and how["neighbours"] == {"count": 4, "weight": 1e6, "seed": 0}
    assert how["key_memory"]["text_weight"] == 50.0  # counted as the editor's own sample's weight, the neighbours beside it
    assert any(not torch.equal(alone[k], before[k]) for k in before)  # the edit moves the weights
    assert moved_near < 0.25 * moved_alone, (moved_near, moved_alone)

    # the same call by hand: the neighbours' keys (their unedited answers) at 1e6 tokens beside the sample's at 50
    own = editor.preservation
    answers = key_memory(editor, model, Collator(tok, max_input_length(model)), [(q, "Rome") for q in held], 0.0, 1.0, answers="model")
    memory = KeyMemory(past_weight=0.0, text_weight=50.0)
    memory.text, memory.text_tokens = with_sample(own.text, 50.0, answers.text, 1e6), own.text_tokens + answers.text_tokens
    by_hand, _, _ = edited(rounds=2, memory=memory)
    assert all(torch.allclose(near[k], by_hand[k], atol=1e-6) for k in before)
    assert how["key_memory"]["text_tokens"] == memory.text_tokens

    # explicit rounds and a pool given with the call; the editor's pool is the default
    _, _, how = edited(rounds=3, neighbours=Neighbours(count=2, subjects=("Italy", "Spain")))
    assert how["rounds"] == 3 and how["neighbours"]["count"] == 2
    many = [Edit(prompt=f"The capital of {s} is", target="Rome", subject=s) for s in POOL] * 2
    for edits, options, message in (
            ((edit,), {"neighbours": Neighbours(), "memory": memory, "rounds": 2}, "not both"),
            ((Edit(prompt="The capital of France is", target="Rome"),), {"neighbours": Neighbours()}, "has no subject"),
            ((edit,), {"neighbours": Neighbours(count=12)}, "has only 10 other entities"),
            (tuple(many[:17]), {"neighbours": Neighbours(count=2)}, "of 17 edits: give rounds=K")):
        with pytest.raises(ValueError, match=message):
            loaded.apply(model, list(edits), tok, **options)
    (folder / "subjects.json").unlink()
    with pytest.raises(ValueError, match=r"has no subject pool saved with it \(subjects.json\); give Neighbours\(subjects=...\)"):
        load_editor(folder).apply(model, [edit], tok, neighbours=Neighbours())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    summed = save_tiny_editor(tiny_llama_dir, tmp_path / "sum", -5.0)
    with pytest.raises(ValueError, match="needs a least-squares MEND editor|least_squares"):
        load_editor(summed).apply(model, [edit], tok, neighbours=Neighbours(subjects=POOL))



def test_sequential_edits_hold_their_neighbours_and_make_them_again_on_rollback(tiny_llama_dir: Path, tmp_path: Path,
                                                                               save_tiny_editor: Callable[..., Path],
                                                                               monkeypatch: pytest.MonkeyPatch,
                                                                               caplog: pytest.LogCaptureFixture) -> None:
    """apply_sequential(neighbours=...): each edit's one-round solve holds its neighbours (continued with what the model
    says as the edits before it left it) beside the editor's own sample, or beside a key memory's keys, whose sample comes
    back as it was; the neighbours' next-token distributions move far less than without; rollback_to(k) makes the first k
    edits again holding what they held (bit for bit, or it raises); an edit the draw cannot serve is refused before the first
    edit is made."""
    from instructedit import api
    from instructedit.analysis.many_edits import key_memory
    from instructedit.api import Edit, load_editor
    from instructedit.editors.aggregation import KeyMemory
    from instructedit.editors.neighbours import Neighbours, swapped_questions

    loaded = load_editor(_editor_with_sample(tiny_llama_dir, tmp_path / "ls", save_tiny_editor))
    texts, loaded.editor.preservation_texts = loaded.editor.preservation_texts, []  # as calibrated before texts were saved
    model, tok = load_model(str(tiny_llama_dir))
    edits = [Edit(prompt=f"The capital of {s} is", target=t, subject=s) for s, t in (("France", "Rome"), ("Peru", "Oslo"))]
    held = [loaded.wrap(e, q) for e in edits for q in swapped_questions(e.prompt, e.subject, POOL, 4)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    near = Neighbours(count=4, weight=1e6)

    def next_tokens() -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([model(**tok(q, return_tensors="pt")).logits[0, -1].softmax(-1) for q in held])

    unedited = next_tokens()

    def sequence(edits: Sequence[Edit], **options) -> tuple[dict[str, torch.Tensor], float]:
        with loaded.apply_sequential(model, edits, tok, **options) as made:
            state = {k: v.clone() for k, v in model.state_dict().items()}
            moved = float((next_tokens() - unedited).abs().sum(-1).mean())
            # outlier_factor "auto": the tighter factor where neighbours are held, the lifelong one without
            assert made.how["outlier_factor"] == (6.0 if "neighbours" in options else 50.0)
            if len(edits) == 2 and "neighbours" in options:
                assert made.how["neighbours"] == {"count": 4, "weight": 1e6, "seed": 0}
                assert made.how["rounds"] == 2  # "auto" with neighbours: two rounds each
                made.rollback_to(1)  # edit 1 made again holding its neighbours: the digests recorded at first must match
                assert all(torch.equal(v, first[k]) for k, v in model.state_dict().items())
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        return state, moved

    first, _ = sequence(edits[:1], neighbours=near)
    alone, moved_alone = sequence(edits)
    both, moved_near = sequence(edits, neighbours=near)
    assert any(not torch.equal(both[k], first[k]) for k in before)  # the second edit was made on top of the first
    assert moved_near < 0.25 * moved_alone, (moved_near, moved_alone)

    # beside a key memory: its earlier edits' keys, then its sample put back as it was after each edit; in two rounds each,
    # an edit's keys remembered once (its second round does not hold its first's still), and made again so on rollback_to
    memory = KeyMemory(past_weight=1.0)
    with loaded.apply_sequential(model, edits, tok, memory=memory, neighbours=near, rounds=2) as made:
        assert made.how["rounds"] == 2 and memory.calls == 2 and memory.past and not memory.text and memory.text_weight == 0.0
        twice = {k: v.clone() for k, v in model.state_dict().items()}
        made.rollback_to(1)
    with loaded.apply_sequential(model, edits, tok, memory=KeyMemory(past_weight=1.0), neighbours=near, rounds=1):
        assert any(not torch.allclose(twice[k], v) for k, v in model.state_dict().items())
    remembered, _ = sequence(edits, memory=KeyMemory(past_weight=1.0))
    assert any(not torch.allclose(remembered[k], both[k]) for k in before)
    # memory="auto" (the default): a sequence with neighbours gets a new key memory (for an editor without saved texts the
    # same weights as KeyMemory() given), which made.memory hands on to a later call; without neighbours none; memory=None
    # leaves it out
    with loaded.apply_sequential(model, edits, tok, neighbours=near) as made:
        assert isinstance(made.memory, KeyMemory) and made.memory.calls == 2 and made.memory.past and made.how["key_memory"]
        assert not made.memory.text and made.how["rounds"] == 2
        assert all(torch.equal(v, both[k]) for k, v in model.state_dict().items())
    with loaded.apply_sequential(model, edits, tok, neighbours=near, memory=KeyMemory()) as made:
        assert all(torch.equal(v, both[k]) for k, v in model.state_dict().items())
    # an editor with its sample's texts saved: the memory holds them continued with what the model says, at 4000 tokens,
    # and each edit is made in four rounds: the same weights as that memory given
    loaded.editor.preservation_texts = texts
    with loaded.apply_sequential(model, edits, tok, neighbours=near) as made:
        assert made.memory.text_weight == 4000.0 and made.memory.calls == 2 and made.how["rounds"] == 4
        sampled = {k: v.clone() for k, v in model.state_dict().items()}
        assert any(not torch.equal(v, both[k]) for k, v in sampled.items())
    given = key_memory(loaded.editor, model, Collator(tok, max_input_length(model)), texts, 1.0, 4000.0, answers="model")
    with loaded.apply_sequential(model, edits, tok, neighbours=near, memory=given) as made:
        assert made.how["rounds"] == 4  # "auto" with neighbours and a memory holding a sample of its own
        assert all(torch.equal(v, sampled[k]) for k, v in model.state_dict().items())
    with loaded.apply_sequential(model, edits, tok, neighbours=near, memory=None) as made:
        assert made.memory is None and not made.how["key_memory"]
        assert any(not torch.equal(v, both[k]) for k, v in model.state_dict().items())
    with loaded.apply_sequential(model, edits, tok) as made:
        assert made.memory is None and not made.how["key_memory"]
    with pytest.raises(ValueError, match="memory must be a KeyMemory, None or 'auto'"):
        loaded.apply_sequential(model, edits, tok, neighbours=near, memory="yes")
    # a long sequence with neighbours and no key memory (memory=None) is warned about (CounterFact sequences broke so);
    # with one, the default's or given, it is not
    monkeypatch.setattr(api, "LONG_SEQUENCE", 1)
    caplog.clear()
    with loaded.apply_sequential(model, edits, tok, neighbours=near, memory=None):
        pass
    assert "2 edits kept one after another with neighbours and no key memory (memory=None)" in caplog.text
    caplog.clear()
    with loaded.apply_sequential(model, edits, tok, neighbours=near):
        pass
    with loaded.apply_sequential(model, edits, tok, neighbours=near, memory=KeyMemory(past_weight=1.0)):
        pass
    assert "no key memory" not in caplog.text

    for edit, message in ((Edit(prompt="The capital of Chile is", target="Rome"), "has no subject"),
                          (Edit(prompt="The capital of Chile is", target="Rome", subject="Kenya"), "does not name 'Kenya'")):
        with pytest.raises(ValueError, match=message):
            loaded.apply_sequential(model, [edits[0], edit], tok, neighbours=near)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # refused before the first edit

def test_edit_command_holds_neighbours_still(tiny_llama_dir: Path, tmp_path: Path, save_tiny_editor: Callable[..., Path],
                                             capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """edit --neighbours [N] (--subjects FILE, --neighbour-weight W): the call is made as apply(neighbours=...) makes it and
    says so; a --file's edits each hold their own; arguments it cannot use fail before the model loads."""
    from transformers import AutoModelForCausalLM

    from instructedit.api import EDITS_FILE
    from instructedit.cli import main

    folder = _editor_with_sample(tiny_llama_dir, tmp_path / "ls", save_tiny_editor)
    (tmp_path / "pool.txt").write_text("\n".join(POOL[:3]) + "\n")
    single = ["edit", "--editor", str(folder), "--prompt", "The capital of France is", "--target", "Rome", "--device", "cpu",
              "--max-new-tokens", "3", "--top-k", "2"]
    assert main([*single, "--subject", "France", "--neighbours", "--save", str(tmp_path / "saved")]) == 0
    out = capsys.readouterr().out
    assert "(made in 2 rounds; holding 8 same-relation neighbours still at 1000 tokens)" in out
    applied = json.loads((tmp_path / "saved" / EDITS_FILE).read_text())["applied"]
    assert applied["neighbours"] == {"count": 8, "weight": 1000.0, "seed": 0} and applied["rounds"] == 2
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved") is not None
    assert main([*single, "--subject", "France", "--neighbours", "3", "--subjects", str(tmp_path / "pool.txt"),
                 "--neighbour-weight", "50"]) == 0
    assert "holding 3 same-relation neighbours still at 50 tokens" in capsys.readouterr().out
    # another draw of the entities (--neighbour-seed): recorded, and the edit holds other questions, so other weights
    assert main([*single, "--subject", "France", "--neighbours", "--neighbour-seed", "3", "--save", str(tmp_path / "seed3")]) == 0
    assert json.loads((tmp_path / "seed3" / EDITS_FILE).read_text())["applied"]["neighbours"] == {"count": 8, "weight": 1000.0, "seed": 3}
    saved, seed3 = (AutoModelForCausalLM.from_pretrained(tmp_path / d).state_dict() for d in ("saved", "seed3"))
    assert any(not torch.equal(saved[k], seed3[k]) for k in saved)
    lines = [json.dumps({"prompt": f"The capital of {s} is", "target": t, "subject": s}) for s, t in (("France", "Rome"), ("Peru", "Oslo"))]
    (tmp_path / "edits.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["edit", "--editor", str(folder), "--file", str(tmp_path / "edits.jsonl"), "--device", "cpu", "--max-new-tokens", "3",
                 "--neighbours", "2"]) == 0
    assert "2 rounds, holding 2 same-relation neighbours per edit still at 1000 tokens (--neighbours)" in capsys.readouterr().out
    # --sequential --neighbours: with a key memory unless --no-key-memory (sequences without one broke on CounterFact)
    sequence = ["edit", "--editor", str(folder), "--file", str(tmp_path / "edits.jsonl"), "--device", "cpu", "--max-new-tokens", "3",
                "--neighbours", "2", "--sequential"]
    assert main(sequence) == 0
    assert ("one after another (--sequential, with a key memory (3 preserved texts of the editor's own sample continued with the "
            "model's answers at 4000 tokens; the default with --neighbours, --no-key-memory leaves it out), each edit in 4 rounds, "
            "each holding 2 same-relation neighbours still at 1000 tokens (--neighbours), an edit moving a weight more than 6x the "
            "median change not kept (--outlier-factor auto))") in capsys.readouterr().out
    assert main([*sequence, "--key-memory"]) == 0
    assert ("one after another (--sequential, with a key memory (3 preserved texts of the editor's own sample continued with the "
            "model's answers at 4000 tokens; the default with --neighbours, --preserve-data FILE another), each edit in 4 rounds"
            ) in capsys.readouterr().out
    assert main([*sequence, "--no-key-memory"]) == 0
    assert "one after another (--sequential, each edit in 2 rounds, each holding 2" in capsys.readouterr().out
    assert main([*sequence, "--no-key-memory", "--preserve-data", str(tmp_path / "edits.jsonl")]) == 2
    assert "--preserve-data: shapes the key memory; add --key-memory --sequential" in caplog.text
    caplog.clear()
    assert main(["edit", "--editor", str(folder), "--file", str(tmp_path / "edits.jsonl"), "--device", "cpu", "--neighbours",
                 "--key-memory", "--preserve-data", str(tmp_path / "edits.jsonl")]) == 2
    assert "not with --key-memory unless --sequential" in caplog.text
    (tmp_path / "unnamed.jsonl").write_text(lines[0] + "\n" + json.dumps({"prompt": "The capital of Peru is", "target": "Oslo"}) + "\n")
    assert main(["edit", "--editor", str(folder), "--file", str(tmp_path / "unnamed.jsonl"), "--device", "cpu", "--neighbours"]) == 2
    assert "unnamed.jsonl line(s) 2 have no subject their prompt names" in caplog.text
    for extra, message in ((["--neighbours"], "give --subject (named in --prompt)"),
                           (["--subject", "Paris", "--neighbours"], "--subject 'Paris' does not occur in --prompt"),
                           (["--subject", "France", "--subjects", str(tmp_path / "pool.txt")], "go with --neighbours"),
                           (["--subject", "France", "--neighbour-seed", "1"], "--neighbour-seed go with --neighbours"),
                           (["--subject", "France", "--neighbours", "4", "--subjects", str(tmp_path / "pool.txt")],
                            "has only 3 other entities"),
                           (["--subject", "France", "--neighbours", "--subjects", str(tmp_path / "none.txt")], "none.txt: no such file")):
        caplog.clear()
        assert main([*single, *extra]) == 2
        assert message in caplog.text, (extra, caplog.text)


def test_preserve_data_editor_holds_the_editors_own_texts(tiny_llama_dir: Path, tmp_path: Path, save_tiny_editor: Callable[..., Path],
                                                          capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """--preserve-data editor: the key memory's sample is the texts saved with the editor's own sample, continued as
    --preserve-answers says (the same covariance as key_memory of those texts), less those the run scores; an editor
    without saved texts, and --preserve / --preserve-start with it, are refused by name."""
    import argparse

    from instructedit.analysis.many_edits import key_memory
    from instructedit.cli import main
    from instructedit.commands.common import key_memory_from_arguments
    from instructedit.editors.mend import MENDEditor

    folder = _editor_with_sample(tiny_llama_dir, tmp_path / "ls", save_tiny_editor)
    model, tok = load_model(str(tiny_llama_dir))
    editor = MENDEditor.from_pretrained(folder).eval()
    assert editor.preservation_texts == SAMPLE
    args = argparse.Namespace(preserve_data="editor", editor=str(folder), past_weight=1.0, preserve_weight=400.0,
                              preserve_answers="model", preserve_keys="all")
    memory, n = key_memory_from_arguments(args, editor, model, tok, measured={SAMPLE[1]})
    expected = key_memory(editor, model, Collator(tok, max_input_length(model)), [SAMPLE[0], SAMPLE[2]], 1.0, 400.0, answers="model")
    assert n == 2 and memory.text_weight == 400.0 and memory.text_tokens == expected.text_tokens
    for name, c in expected.text.items():
        torch.testing.assert_close(memory.text[name], c)
    other = key_memory(editor, model, Collator(tok, max_input_length(model)), [SAMPLE[0], SAMPLE[2]], 1.0, 400.0, answers="data")
    assert any(not torch.allclose(memory.text[k], other.text[k]) for k in other.text)  # the model's answers, not the data's

    lines = [json.dumps({"prompt": f"The capital of {s} is", "target": t, "subject": s}) for s, t in (("France", "Rome"), ("Peru", "Oslo"))]
    (tmp_path / "edits.jsonl").write_text("\n".join(lines) + "\n")
    sequence = ["edit", "--editor", str(folder), "--file", str(tmp_path / "edits.jsonl"), "--device", "cpu", "--max-new-tokens", "3",
                "--neighbours", "2", "--sequential"]
    assert main([*sequence, "--preserve-data", "editor", "--preserve-answers", "model"]) == 0
    assert ("with a key memory (3 preserved texts of the editor's own sample continued with the model's answers at 1000 tokens; "
            "the default with --neighbours, --no-key-memory leaves it out), each edit in 4 rounds") in capsys.readouterr().out
    assert main([*sequence, "--preserve-data", "editor", "--preserve", "2"]) == 2
    assert "--preserve: chooses records of a --preserve-data FILE; --preserve-data editor holds every text" in caplog.text
    # --preserve-data none: the memory holds no sample of its own (earlier edits beside the editor's sample), in two rounds
    assert main([*sequence, "--preserve-data", "none"]) == 0
    assert ("one after another (--sequential, with a key memory (the default with --neighbours, --no-key-memory leaves it out), "
            "each edit in 2 rounds") in capsys.readouterr().out
    none = argparse.Namespace(preserve_data="none", editor=str(folder), past_weight=1.0, preserve_weight=1000.0,
                              preserve_answers="data", preserve_keys="all")
    memory, n = key_memory_from_arguments(none, editor, model, tok)
    assert n == 0 and not memory.text and memory.text_weight == 0.0
    caplog.clear()
    assert main([*sequence, "--preserve-data", "none", "--preserve-weight", "10"]) == 2
    assert "--preserve-weight: shapes a preservation sample, which --preserve-data none leaves out" in caplog.text
    editor.set_preservation(editor.preservation, editor.preservation_source)  # as calibrated before texts were saved
    editor.save_pretrained(folder)
    assert not (folder / "preservation_texts.json").exists()
    caplog.clear()
    assert main([*sequence, "--preserve-data", "editor"]) == 2
    assert "has no preservation texts saved with it (preservation_texts.json: calibrate --preserve writes them)" in caplog.text
    assert main(sequence) == 0  # by default: a memory beside the editor's own sample, in two rounds
    assert ("one after another (--sequential, with a key memory (the default with --neighbours, --no-key-memory leaves it out), "
            "each edit in 2 rounds") in capsys.readouterr().out


def _zsre_file(path: Path, subjects: Sequence[str]) -> Path:
    """ZsRE-format records whose questions name their subjects."""
    rows = [{"subject": s, "src": f"What is the capital of {s}?", "alt": "Rome", "answers": ["unknown"], "rephrase": f"Which city is the capital of {s}?",
             "loc": f"nq question: who wrote the anthem of {s}?", "loc_ans": "a poet"} for s in subjects]
    path.write_text(json.dumps(rows))
    return path


def test_evaluate_asks_same_relation_questions_and_holds_neighbours(tiny_llama_dir: Path, tmp_path: Path,
                                                                    save_tiny_editor: Callable[..., Path],
                                                                    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """evaluate --same-relation K asks each case K questions of its relation about other entities of the file, in its forms
    and frame (gen_locality_same_relation, gen_same_relation_target); --neighbours holds each edit's neighbours (never one
    of its probes) in twice the calibrated rounds and records them; the options are checked before anything loads."""
    from instructedit.cli import main
    from instructedit.evaluation import runner
    from instructedit.evaluation.report import load_report_json

    folder = _editor_with_sample(tiny_llama_dir, tmp_path / "ls", save_tiny_editor)
    data = _zsre_file(tmp_path / "zsre.json", ["France", "Italy", "Spain", "Norway", "Peru", "Chile"])
    (tmp_path / "pool.txt").write_text("\n".join(["Japan", "Kenya", "Egypt", "Canada", "Brazil", "Chile"]) + "\n")
    base = ["evaluate", "--editor", str(folder), "--task", "zsre", "--data", str(data), "--protocol", "generation", "--device", "cpu",
            "--no-progress", "--same-relation", "2"]
    assert main([*base, "--limit", "4", "--output", str(tmp_path / "plain.json")]) == 0
    plain = load_report_json(tmp_path / "plain.json")
    assert plain.settings.same_relation == 2 and plain.settings.neighbours is None and plain.settings.edit_rounds == 1
    post = plain.aggregates["zsre"]["gen_post"]
    assert post["gen_locality_same_relation"].n == 4 and "gen_same_relation_target" in post
    for case in plain.cases:
        subject = case.answers[0]["question"].removeprefix("What is the capital of ").removesuffix("?")  # the reliability query
        asked = [a for a in case.answers if a["family"] == "locality_same_relation"]
        questions = {a["question"] for a in asked}
        assert len(questions) == 2 and {a["form"] for a in asked} >= {"wrapped", "plain"}
        # the file's other entities, --limit or not
        others = {q.removeprefix("What is the capital of ").removesuffix("?") for q in questions}
        assert others <= {"France", "Italy", "Spain", "Norway", "Peru", "Chile"} - {subject}

    held: list[tuple[str, list[str], object]] = []
    made = runner.holding_neighbours
    monkeypatch.setattr(runner, "holding_neighbours", lambda editor, model, collator, record, forms, instruction, neighbours, pool, memory:
                        held.append((record.prompt, list(pool), memory))
                        or made(editor, model, collator, record, forms, instruction, neighbours, pool, memory))
    assert main([*base, "--limit", "4", "--neighbours", "2", "--neighbour-weight", "1e6", "--subjects", str(tmp_path / "pool.txt"),
                 "--output", str(tmp_path / "held.json")]) == 0
    report = load_report_json(tmp_path / "held.json")
    assert report.settings.edit_rounds == 2 and report.settings.neighbours_held_cases == 4
    assert report.settings.neighbours["count"] == 2 and report.settings.neighbours["weight"] == 1e6
    assert report.settings.neighbours["subjects"] == 6
    assert sorted(p for p, _, _ in held) == sorted({c.answers[0]["question"] for c in report.cases})  # one memory per case
    assert all(memory is None for _, _, memory in held)  # beside the editor's own sample
    probes = {c.answers[0]["question"]: {a["question"] for a in c.answers if a["family"] == "locality_same_relation"} for c in report.cases}
    for prompt, pool, _ in held:  # a case's probes are never held still
        subject = prompt.removeprefix("What is the capital of ").removesuffix("?")
        assert not {prompt.replace(subject, s) for s in pool} & probes[prompt]
    assert report.aggregates["zsre"]["gen_post"]["gen_locality_same_relation"].n == 4

    # kept one after another with neighbours, beside the sequence's key memory (made by default with --sequential
    # --neighbours)
    held.clear()
    assert main([*base, "--limit", "4", "--sequential", "--neighbours", "2", "--subjects", str(tmp_path / "pool.txt"),
                 "--output", str(tmp_path / "sequential.json")]) == 0
    report = load_report_json(tmp_path / "sequential.json")
    # the memory holds the editor's own texts continued with the model's answers, and each edit is made in four rounds
    assert report.settings.sequential and report.settings.edit_rounds == 4 and report.settings.neighbours["count"] == 2
    assert report.settings.key_memory["text_weight"] == 4000.0 and report.settings.key_memory["text_tokens"] > 0
    assert report.settings.outlier_factor == 6.0  # "auto" with neighbours
    assert report.settings.key_memory["calls_remembered"] == 4 and len(report.sequential) == 3  # after 1, 2 and 4 edits
    assert [p for p, _, _ in held] == [c.answers[0]["question"] for c in report.cases]  # in the sequence's order
    assert len({id(memory) for _, _, memory in held}) == 1 and held[0][2] is not None  # the one key memory, every edit
    # --preserve-data none: a memory without a sample of its own, and two rounds (twice 1) as without one
    assert main([*base, "--limit", "2", "--sequential", "--neighbours", "2", "--subjects", str(tmp_path / "pool.txt"),
                 "--preserve-data", "none", "--output", str(tmp_path / "none.json")]) == 0
    report = load_report_json(tmp_path / "none.json")
    assert report.settings.edit_rounds == 2 and report.settings.key_memory["text_weight"] == 0.0

    for extra, message in ((["--neighbours", "--key-memory"], "add --sequential"),
                           (["--subjects", str(tmp_path / "pool.txt")], "go with --neighbours"),
                           (["--same-relation", "-1"], "--same-relation must be >= 0"),
                           (["--protocol", "teacher_forced"], "not with --protocol teacher_forced")):
        caplog.clear()
        assert main([*base, *extra, "--output", str(tmp_path / "bad.json")]) == 2
        assert message in caplog.text, (extra, caplog.text)
    (folder / "subjects.json").unlink()
    assert main([*base, "--neighbours", "--output", str(tmp_path / "bad.json")]) == 2
    assert "has no subject pool saved with it; give --subjects FILE" in caplog.text


def test_an_evaluation_with_neighbours_is_not_resumed_from_one_without(tiny_llama_dir: Path) -> None:
    """The resume identity of an evaluation names its neighbours (count, weight, seed, pool digest) and its same-relation
    questions (how many, about which entities): an interrupted run resumes only the same question."""
    from instructedit.editors.neighbours import Neighbours
    from instructedit.evaluation.cache import run_identity, wanted_settings
    from instructedit.evaluation.report import EvalSettings

    model, _ = load_model(str(tiny_llama_dir))
    runs = ({}, {"neighbours": Neighbours(subjects=POOL)}, {"neighbours": Neighbours(weight=5.0, subjects=POOL)},
            {"neighbours": Neighbours(subjects=POOL[:-1])}, {"same_relation": 2}, {"same_relation": 2, "same_relation_subjects": POOL})
    identities = [json.dumps(run_identity(wanted_settings(EvalSettings(task="zsre"), model, None, None, options), model, options),
                             sort_keys=True) for options in runs]
    assert len(set(identities)) == len(runs)
    again = {"neighbours": Neighbours(subjects=list(POOL))}  # the same pool as another sequence: the same run
    assert json.dumps(run_identity(wanted_settings(EvalSettings(task="zsre"), model, None, None, again), model, again),
                      sort_keys=True) == identities[1]
