"""Collation: answer-only shifted labels on both tokenizer kinds (BOS or not), HF-consistent loss, meta-batches."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from instructedit.models.loading import load_model
from instructedit.records import ConvSentExtras, EditRecord, QAItem, TokenBatch
from instructedit.tasks.collate import IGNORE, Collator, PromptTooLongError, encode_answer
from instructedit.tasks.instructions import InstructionPool

PAIRS = [("The capital of France is", "Paris"), ("Toko Yasuda, the", "piano")]

Tiny = tuple[str, PreTrainedModel, PreTrainedTokenizerBase]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request: pytest.FixtureRequest) -> Tiny:
    """(kind, model, tokenizer) through the real loading path, once per module and kind."""
    folder: Path = request.getfixturevalue(f"tiny_{request.param}_dir")
    model, tok = load_model(str(folder))
    return request.param, model, tok


def labelled_text(tok: PreTrainedTokenizerBase, batch: TokenBatch, row: int) -> str:
    return tok.decode(batch.labels[row][batch.label_mask[row]].tolist())


def input_text(tok: PreTrainedTokenizerBase, batch: TokenBatch, row: int) -> str:
    return tok.decode(batch.input_ids[row][batch.attention_mask[row].bool()].tolist(), skip_special_tokens=True)


def assert_same_batch(a: TokenBatch, b: TokenBatch) -> None:
    for name in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# --- label alignment ---------------------------------------------------------------------------


def test_labels_are_the_answer_tokens(tiny: Tiny) -> None:
    _, _, tok = tiny
    batch = Collator(tok).qa_batch(PAIRS)
    assert [labelled_text(tok, batch, i).strip() for i in range(2)] == ["Paris", "piano"]
    if tok.bos_token_id is not None:
        assert not (batch.labels == tok.bos_token_id).any()


def test_an_answer_after_a_prompt_ending_in_whitespace_takes_no_extra_space(tiny: Tiny) -> None:
    _, _, tok = tiny  # a chat template's opened assistant turn ends in a newline: the answer's natural first token follows
    ids, n = encode_answer(tok, "User: The capital of France is\nAssistant:\n", "Rome")
    spaced, m = encode_answer(tok, "The capital of France is", "Rome")
    assert tok.decode(ids[n:]) == "Rome" and tok.decode(spaced[m:]) == " Rome"


def test_labels_are_shifted_next_tokens(tiny: Tiny) -> None:
    _, _, tok = tiny
    batch = Collator(tok).qa_batch(PAIRS)
    for i, (prompt, answer) in enumerate(PAIRS):
        full, n_prompt = encode_answer(tok, prompt, answer)
        n = len(full) - 1  # the input drops the last token: nothing follows it
        assert batch.input_ids[i, :n].tolist() == full[:-1]
        labelled = batch.label_mask[i].nonzero().flatten().tolist()
        assert labelled == list(range(n_prompt - 1, n))  # the last prompt position predicts the first answer token
        for t in labelled:
            assert batch.labels[i, t].item() == full[t + 1]
        assert full[:n_prompt] == tok(prompt)["input_ids"]


def test_padding_is_on_the_right(tiny: Tiny) -> None:
    _, _, tok = tiny
    collator = Collator(tok)
    batch = collator.qa_batch(PAIRS)
    lengths = [len(encode_answer(tok, p, a)[0]) - 1 for p, a in PAIRS]
    assert batch.input_ids.shape == (2, max(lengths))
    assert min(lengths) < max(lengths)  # the batch really is padded
    for i, n in enumerate(lengths):
        assert batch.attention_mask[i, :n].eq(1).all()
        assert batch.attention_mask[i, n:].eq(0).all()
        assert batch.input_ids[i, n:].eq(collator.pad_id).all()
        assert batch.labels[i, n:].eq(IGNORE).all()
    assert collator.pad_id == tok.pad_token_id


def test_llama_bos_leads_and_is_never_labelled(tiny_llama_dir: Path) -> None:
    _, tok = load_model(str(tiny_llama_dir))
    assert tok.bos_token_id is not None
    batch = Collator(tok).qa_batch(PAIRS)
    assert batch.input_ids[:, 0].eq(tok.bos_token_id).all()
    assert batch.labels[:, 0].eq(IGNORE).all()
    assert not batch.labels.eq(tok.bos_token_id).any()
    # the answer is read from the joint tokenization: no BOS in the middle of the input either
    assert batch.input_ids[:, 1:].ne(tok.bos_token_id).all()


def test_gpt2_adds_no_special_tokens(tiny_gpt2_dir: Path) -> None:
    _, tok = load_model(str(tiny_gpt2_dir))
    batch = Collator(tok).qa_batch(PAIRS)
    row = batch.input_ids[0][batch.attention_mask[0].bool()]  # row 0 is the padded one
    assert row.tolist() == tok("The capital of France is Paris")["input_ids"][:-1]
    assert tok("The capital of France is")["input_ids"][0] != tok.bos_token_id
    assert labelled_text(tok, batch, 0) == " Paris"


def test_loss_agrees_with_hf_semantics(tiny: Tiny) -> None:
    """Our shifted labels scored against the logits give the loss HF computes from unshifted labels."""
    _, model, tok = tiny
    batch = Collator(tok).qa_batch(PAIRS)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (batch, seq, vocab)
        for i, (prompt, answer) in enumerate(PAIRS):
            mask = batch.label_mask[i]
            ours = F.cross_entropy(logits[i][mask], batch.labels[i][mask])
            full, n_prompt = encode_answer(tok, prompt, answer)
            hf_labels = torch.tensor([[IGNORE] * n_prompt + full[n_prompt:]])  # HF shifts these itself
            hf = model(input_ids=torch.tensor([full]), labels=hf_labels).loss
            torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-5)


def test_empty_answer_is_refused(tiny: Tiny) -> None:
    _, _, tok = tiny
    with pytest.raises(ValueError, match="empty answer"):
        Collator(tok).qa_batch([("The capital of France is", "  ")])


def test_empty_prompt_without_bos_is_refused(tiny_gpt2_dir: Path) -> None:
    """With no prompt token, no position predicts the first answer token: refuse rather than misalign."""
    _, tok = load_model(str(tiny_gpt2_dir))
    with pytest.raises(ValueError, match="empty prompt for answer 'Paris'"):
        Collator(tok).qa_batch([("", "Paris"), ("The capital of France is", "Paris")])


def test_empty_prompt_with_bos_is_predicted_from_bos(tiny_llama_dir: Path) -> None:
    _, tok = load_model(str(tiny_llama_dir))
    batch = Collator(tok).qa_batch([("", "Paris")])
    assert batch.input_ids[0, 0].item() == tok.bos_token_id
    assert labelled_text(tok, batch, 0).strip() == "Paris"
    assert batch.labels[0, 0].item() == encode_answer(tok, "", "Paris")[0][1]


def test_prompt_too_long_names_input_and_limit(tiny: Tiny) -> None:
    _, _, tok = tiny
    prompt = "The name of the country which Goursez Vreizh is associated with is"
    with pytest.raises(PromptTooLongError, match=r"train_cf\.json#5.*'The name of the country.*model\.max_length=8"):
        Collator(tok, max_length=8).qa_batch([(prompt, "France")], where="train_cf.json#5")
    assert issubclass(PromptTooLongError, ValueError)


# --- meta-batches ------------------------------------------------------------------------------

LOC = QAItem(prompt="The name of the country which Goursez Vreizh is associated with is", answer="France")
FALLBACK = tuple(QAItem(prompt=f"nq question: what is city number {i}?", answer=city)
                 for i, city in enumerate(["London", "Rome", "Berlin", "Paris", "Sweden"]))


def cf_record(rephrase: tuple[str, ...] = ("The capital city of France is",), locality: tuple[QAItem, ...] = (LOC,),
              source: str = "train_cf.json#1") -> EditRecord:
    return EditRecord(task="counterfact", prompt="The capital of France is", target_new="Rome", rephrase=rephrase,
                      locality=locality, source=source)


def convsent_record() -> EditRecord:
    extras = ConvSentExtras(
        topic="Estero", label="negative",
        target_responses=("Well, it has some bad reviews.", "It is bad.", "I do not like it.", "Not for me."),
        opposite_responses=("I really like his style.", "It is great.", "Wonderful place."),
    )
    return EditRecord(task="convsent", prompt="What do you think of Estero?", target_new=extras.target_responses[0],
                      convsent=extras, locality=(LOC,), source="blender_val.json#1")


@pytest.fixture
def collator(tiny: Tiny) -> Collator:
    return Collator(tiny[2], max_length=512, pool=InstructionPool.default(), convsent_pairs=2)


def test_meta_batch_wraps_edit_inputs_not_locality(collator: Collator) -> None:
    tok, pool, record = collator.tokenizer, collator.pool, cf_record()
    meta = collator.meta_batch([record], [3])
    inner = input_text(tok, meta.edit_inner, 0)
    assert "Task: counterfact" in inner and "Input: The capital of France is" in inner
    assert labelled_text(tok, meta.edit_inner, 0).strip() == "Rome"
    assert_same_batch(meta.edit_inner, collator.qa_batch([(pool.render(record, record.prompt, 3), "Rome")]))
    loc = input_text(tok, meta.loc, 0)
    assert "Task:" not in loc and loc.startswith(LOC.prompt)
    assert_same_batch(meta.loc, collator.qa_batch([(LOC.prompt, LOC.answer)]))
    assert meta.unlikely is None and meta.tasks == ["counterfact"]


def test_edit_outer_uses_the_rephrase(collator: Collator) -> None:
    tok, pool, record = collator.tokenizer, collator.pool, cf_record()
    meta = collator.meta_batch([record], [3], edit_loss_on="rephrase")
    outer = input_text(tok, meta.edit_outer, 0)
    assert "Task: counterfact" in outer and "Input: The capital city of France is" in outer
    assert_same_batch(meta.edit_outer, collator.qa_batch([(pool.render(record, record.rephrase[0], 3), "Rome")]))


def test_edit_outer_falls_back_to_edit_inner(collator: Collator) -> None:
    on_input = collator.meta_batch([cf_record()], [3], edit_loss_on="edit_input")
    assert_same_batch(on_input.edit_outer, on_input.edit_inner)
    no_rephrase = collator.meta_batch([cf_record(rephrase=())], [3], edit_loss_on="rephrase")
    assert_same_batch(no_rephrase.edit_outer, no_rephrase.edit_inner)


def test_edit_outer_adds_the_chat_form_where_the_tokenizer_has_a_chat_template(collator: Collator) -> None:
    tok, pool, record = collator.tokenizer, collator.pool, cf_record()
    saved = tok.chat_template
    try:
        tok.chat_template = None  # no template: the rephrase alone
        assert_same_batch(collator.meta_batch([record], [3], edit_loss_on="rephrase+chat").edit_outer,
                          collator.meta_batch([record], [3], edit_loss_on="rephrase").edit_outer)
        tok.chat_template = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"
        meta = collator.meta_batch([record, convsent_record()], [3, 3], edit_loss_on="rephrase+chat")
        alone = collator.meta_batch([record], [3], edit_loss_on="rephrase+chat")
    finally:
        tok.chat_template = saved
    rephrased, chat = (pool.render(record, record.rephrase[0], 3), "Rome"), (f"User: {record.prompt}\nAssistant:", "Rome")
    assert_same_batch(alone.edit_outer, collator.qa_batch([rephrased, chat]))  # the rephrase, then the chat form
    assert labelled_text(tok, alone.edit_outer, 1).strip() == "Rome"
    convsent = collator.meta_batch([convsent_record()], [3]).edit_outer  # ConvSent: its held-out responses, no chat row
    assert meta.edit_outer.n_rows == 2 + convsent.n_rows
    with pytest.raises(ValueError, match="edit_loss_on"):
        from instructedit.config import load_config
        load_config(None, ["training.edit_loss_on=chat"])


def test_edit_outer_adds_the_bare_question_and_the_chat_form(collator: Collator) -> None:
    tok, pool, record = collator.tokenizer, collator.pool, cf_record()
    saved = tok.chat_template
    try:
        tok.chat_template = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"
        three = collator.meta_batch([record], [3], edit_loss_on="rephrase+plain+chat").edit_outer
        bare = collator.meta_batch([record], [None], edit_loss_on="rephrase+plain+chat").edit_outer
    finally:
        tok.chat_template = saved
    rephrased, plain, chat = ((pool.render(record, record.rephrase[0], 3), "Rome"), (record.prompt, "Rome"),
                              (f"User: {record.prompt}\nAssistant:", "Rome"))
    assert_same_batch(three, collator.qa_batch([rephrased, plain, chat], stop=True))  # the rephrase, the bare question, the chat form
    assert [labelled_text(tok, three, i).strip() for i in range(3)] == ["Rome"] * 3
    # without an instruction the bare question is the rephrase's own form: only the chat row is added
    assert_same_batch(bare, collator.qa_batch([(record.rephrase[0], "Rome"), chat], stop=True))


def test_edit_forms_make_each_edit_in_the_wrapped_and_the_chat_form(collator: Collator) -> None:
    from instructedit.tasks.collate import check_edit_forms

    tok, pool, record = collator.tokenizer, collator.pool, cf_record()
    with pytest.raises(ValueError, match="chat template"):  # the chat form needs the tokenizer's chat template
        Collator(tok, 512, pool, edit_forms=["wrapped", "chat"])
    saved = tok.chat_template
    try:
        tok.chat_template = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"
        both = Collator(tok, 512, pool, edit_forms=["chat", "wrapped"], answer_stop="eos")  # kept in EDIT_FORMS order
        chat_only = Collator(tok, 512, pool, edit_forms=["chat"])
        meta = both.meta_batch([record, convsent_record()], [3, 3])
        wrapped, chat = (pool.render(record, record.prompt, 3), "Rome"), (f"User: {record.prompt}\nAssistant:", "Rome")
        assert both.edit_forms == ("wrapped", "chat") and both.edit_pairs(record, 3) == [wrapped, chat]
        assert chat_only.edit_pairs(record, 3) == [chat] and chat_only.edit_pairs(record, None) == [chat]
        cs = convsent_record()  # ConvSent: its target responses in the wrapped form only (it has no single answer to chat)
        assert both.edit_pairs(cs, 3) == collator.edit_pairs(cs, 3) == chat_only.edit_pairs(cs, 3)
        assert_same_batch(meta.edit_inner, both.qa_batch([wrapped, chat, *collator.edit_pairs(cs, 3)], stop=True))
    finally:
        tok.chat_template = saved
    assert labelled_text(tok, meta.edit_inner, 1).strip() == f"Rome{tok.eos_token}"  # the chat row ends with the stop too
    assert check_edit_forms("chat, wrapped") == ("wrapped", "chat")
    for bad in (["wrapped", "wrapped"], [], ["bare"], "wrapped,shouted"):
        with pytest.raises(ValueError, match=r"queries\.edit_forms: .* must be distinct forms out of \['wrapped', 'plain', 'chat'\]"):
            check_edit_forms(bad, "queries.edit_forms")
    from instructedit.config import load_config
    with pytest.raises(ValueError, match="training.edit_forms"):
        load_config(None, ["training.edit_forms=[wrapped, bare]"])
    assert load_config(None, ["training.edit_forms=[wrapped, chat]"]).training.edit_forms == ["wrapped", "chat"]


def test_the_plain_edit_form_is_the_bare_question_made_once_without_an_instruction(collator: Collator) -> None:
    tok, pool, record = collator.tokenizer, collator.pool, cf_record()
    forms = Collator(tok, 512, pool, edit_forms=["plain", "wrapped"], answer_stop="newline")
    wrapped, plain = (pool.render(record, record.prompt, 3), "Rome"), (record.prompt, "Rome")
    assert forms.edit_forms == ("wrapped", "plain") and forms.edit_pairs(record, 3) == [wrapped, plain]
    assert forms.edit_pairs(record, None) == [plain]  # without an instruction the two forms are one input, not a doubled one
    assert Collator(tok, 512, pool, edit_forms=["plain"]).edit_pairs(record, 3) == [plain]
    assert [forms.form_prompt(record, f, 3) for f in forms.edit_forms] == [wrapped[0], plain[0]]
    with pytest.raises(ValueError, match="chat template"):
        forms.form_prompt(record, "chat", 3)
    meta = forms.meta_batch([record, convsent_record()], [3, 3])  # ConvSent keeps its wrapped responses only
    assert_same_batch(meta.edit_inner, forms.qa_batch([wrapped, plain, *collator.edit_pairs(convsent_record(), 3)], stop=True))
    assert labelled_text(tok, meta.edit_inner, 1) == " Rome\n"  # the bare row's answer, its newline stop labelled too


def test_no_instruction_means_raw_prompt(collator: Collator) -> None:
    meta = collator.meta_batch([cf_record()], [None])
    assert_same_batch(meta.edit_inner, collator.qa_batch([("The capital of France is", "Rome")]))
    bare = Collator(collator.tokenizer)
    with pytest.raises(ValueError, match="no instruction pool"):
        bare.meta_batch([cf_record()], [0])


def test_convsent_rows(collator: Collator) -> None:
    tok, record = collator.tokenizer, convsent_record()
    cs = record.convsent
    assert cs is not None
    meta = collator.meta_batch([cf_record(), record], [0, 2])
    assert meta.tasks == ["counterfact", "convsent"]
    assert meta.unlikely is not None

    def answers(batch: TokenBatch) -> list[str]:
        return [labelled_text(tok, batch, i).strip() for i in range(batch.input_ids.shape[0])]

    assert answers(meta.edit_inner) == ["Rome", *cs.target_responses[:2]]
    assert answers(meta.edit_outer) == ["Rome", *cs.target_responses[2:4]]
    assert answers(meta.unlikely) == list(cs.opposite_responses[:2])
    for batch in (meta.edit_inner, meta.edit_outer, meta.unlikely):
        for i in range(batch.input_ids.shape[0]):
            text = input_text(tok, batch, i)
            assert text.startswith("Task: ") and "[" not in text
    convsent_input = input_text(tok, meta.unlikely, 0)
    assert "negative" in convsent_input and "Estero" in convsent_input
    assert "Input: What do you think of Estero?" in convsent_input
    assert meta.loc.input_ids.shape[0] == 2  # one locality row per record, not per response


def test_convsent_with_few_responses_reuses_them_for_edit_outer(collator: Collator) -> None:
    record = convsent_record()
    assert record.convsent is not None
    short = dataclasses.replace(record, convsent=ConvSentExtras(
        topic="Estero", label="negative", target_responses=("It is bad.",), opposite_responses=("It is great.",)))
    meta = collator.meta_batch([short], [0])
    assert_same_batch(meta.edit_outer, meta.edit_inner)


def test_missing_locality_uses_the_fallback_pool_deterministically(tiny: Tiny) -> None:
    tok = tiny[2]
    records = [cf_record(locality=(), source=f"recent_train.json#{i}") for i in range(20)]
    first = Collator(tok, max_length=512, fallback_locality=FALLBACK)
    again = Collator(tok, max_length=512, fallback_locality=FALLBACK)
    items = [first.locality_item(r) for r in records]
    assert items == [again.locality_item(r) for r in records]
    assert set(items) <= set(FALLBACK) and len(set(items)) > 1
    meta = first.meta_batch(records[:1], [None])
    assert_same_batch(meta.loc, first.qa_batch([(items[0].prompt, items[0].answer)]))


def test_missing_locality_without_fallback_names_the_record(tiny: Tiny) -> None:
    collator = Collator(tiny[2], max_length=512)
    with pytest.raises(ValueError, match=r"recent_train\.json#4 has no locality item"):
        collator.meta_batch([cf_record(locality=(), source="recent_train.json#4")], [None])


def test_meta_batch_too_long_names_the_record(tiny: Tiny) -> None:
    collator = Collator(tiny[2], max_length=16, pool=InstructionPool.default())
    with pytest.raises(PromptTooLongError, match=r"train_cf\.json#1.*model\.max_length=16"):
        collator.meta_batch([cf_record()], [0])


def test_meta_batch_needs_one_instruction_per_record(collator: Collator) -> None:
    with pytest.raises(ValueError):
        collator.meta_batch([cf_record(), cf_record()], [0])


def test_locality_frames_add_the_locality_question_in_the_edits_own_frame(collator: Collator) -> None:
    tok, pool, record = collator.tokenizer, collator.pool, cf_record()
    raw = collator.meta_batch([record], [3]).loc
    other = cf_record(source="train_cf.json#2")
    both = collator.meta_batch([record, other], [3, 5], locality_frames=("raw", "wrapped")).loc
    # per record: the raw question, then the same question in that record's instruction frame, both with its answer
    expected = [(LOC.prompt, LOC.answer), (pool.render(record, LOC.prompt, 3), LOC.answer),
                (LOC.prompt, LOC.answer), (pool.render(other, LOC.prompt, 5), LOC.answer)]
    assert_same_batch(both, collator.qa_batch(expected))
    assert_same_batch(collator.meta_batch([record], [3], locality_frames=("raw",)).loc, raw)
    assert "Task: counterfact" in input_text(tok, both, 1) and "Task:" not in input_text(tok, both, 0)
    assert labelled_text(tok, both, 1).strip() == LOC.answer
    # in the edit's frame alone; and without an instruction there is one frame, the raw one
    assert_same_batch(collator.meta_batch([record], [3], locality_frames=("wrapped",)).loc, collator.qa_batch(expected[1:2]))
    assert_same_batch(collator.meta_batch([record], [None], locality_frames=("raw", "wrapped")).loc, raw)
