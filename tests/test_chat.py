"""Chat-wrapped prompts (``--chat``): the user turn of the tokenizer's chat template, the subject's token
span found inside it, targets read after the assistant prefix, and edits that land on the wrapped prompt."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from factedit.data.counterfact import load_counterfact
from factedit.editing.hparams import ROMEHyperParams
from factedit.editing.report import edit_and_compare
from factedit.editing.requests import EditRequest
from factedit.editing.resources import EditResources
from factedit.editing.values import build_value_problem
from factedit.errors import FactEditError
from factedit.evaluation.config import RunConfig
from factedit.models.chat import chat_format, prompt_format
from factedit.text import encode_with_subject, target_ids

from .requests_for_tests import REQUEST, TEMPLATES
from .tiny_models import tiny_model


def test_wrap_keeps_the_prompt_inside_the_user_turn(tokenizer):
    fmt = chat_format(tokenizer)
    wrapped = fmt.wrap(REQUEST.prompt)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": REQUEST.text}], tokenize=False, add_generation_prompt=True
    )
    assert wrapped.replace("{}", REQUEST.subject) == rendered  # exactly what the template itself writes
    assert wrapped.count("{}") == 1 and fmt.unwrap(wrapped) == REQUEST.prompt
    assert fmt.after.endswith("assistant\n")


@pytest.mark.parametrize("prompt", ["{} is located in", "The {} is located in the city of", "Where is {}?"])
def test_subject_span_is_found_inside_the_template(tokenizer, prompt):
    fmt = chat_format(tokenizer)
    for subject in ("Eiffel Tower", "Danielle Darrieux", "Olot"):
        enc = encode_with_subject(tokenizer, fmt.wrap(prompt), subject)
        span = tokenizer.decode(enc.ids[enc.subject_first : enc.subject_last + 1])
        assert span.strip() == subject
        # the span sits in the user turn: after the system message and before the assistant prefix
        before = tokenizer.decode(enc.ids[: enc.subject_first])
        assert before.endswith(fmt.before.rsplit("\n", 1)[0] + "\n") or "user" in before


def test_targets_follow_the_assistant_prefix_without_a_space(tokenizer):
    fmt = chat_format(tokenizer)
    chat = REQUEST.in_format(fmt)
    assert REQUEST.new_text == " Rome" and chat.new_text == "Rome"
    ids = target_ids(tokenizer, chat.text, chat.new_text)
    assert tokenizer.decode(ids) == "Rome"
    assert chat.subject == REQUEST.subject and chat.target_new == REQUEST.target_new
    assert REQUEST.in_format(None) is REQUEST


def test_no_chat_template_is_one_line_error(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(FactEditError, match="has no chat template") as info:
        chat_format(plain, "model gemma3-270m")
    assert "\n" not in str(info.value)
    assert prompt_format(plain, "raw") is None
    with pytest.raises(FactEditError, match="unknown prompt format"):
        prompt_format(tokenizer, "html")


def test_template_writing_braces_is_refused(tokenizer):
    odd = copy.deepcopy(tokenizer)
    odd.chat_template = "{% for m in messages %}{{ '{' }}{{ m['content'] }}{{ '}' }}{% endfor %}"
    with pytest.raises(FactEditError, match="braces"):
        chat_format(odd)


def test_run_config_refuses_unknown_prompt_formats():
    with pytest.raises(FactEditError, match="prompts_eval must be one of raw, chat"):
        RunConfig(method="rome", dataset="counterfact", prompts_eval="markdown").check()


def test_counterfact_case_in_transfer_formats(tokenizer, data_dir):
    cases = load_counterfact(data_dir / "counterfact" / "counterfact_dev.json", n=3).cases
    fmt = chat_format(tokenizer)
    case = cases[0]
    raw_edit_chat_eval = case.in_formats(None, fmt)
    assert raw_edit_chat_eval.request == case.request  # the edit is made on the raw prompt
    assert raw_edit_chat_eval.rewrite_prompts() == [fmt.wrap(case.request.text)]
    assert raw_edit_chat_eval.scored_request.new_text == case.request.target_new.strip()
    assert all(p.startswith(fmt.before) for p in raw_edit_chat_eval.neighborhood_prompts)
    chat_edit_raw_eval = case.in_formats(fmt, None)
    assert chat_edit_raw_eval.request.prompt == fmt.wrap(case.request.prompt)
    assert chat_edit_raw_eval.rewrite_prompts() == case.rewrite_prompts()
    assert chat_edit_raw_eval.neighborhood_prompts == case.neighborhood_prompts
    both = case.in_formats(fmt, fmt)
    assert both.eval_request is None and both.rewrite_prompts() == [
        fmt.wrap(case.request.prompt).replace("{}", case.request.subject)
    ]


def test_value_problem_reads_the_subject_inside_the_template(tokenizer):
    fmt = chat_format(tokenizer)
    chat = REQUEST.in_format(fmt)
    problem = build_value_problem(tokenizer, chat, TEMPLATES, "subject_last")
    for template, ids, lookup, length in zip(
        TEMPLATES, problem.rewrite_prompts, problem.rewrite_lookup, problem.prompt_lengths, strict=True
    ):
        enc = encode_with_subject(tokenizer, template.replace("{}", chat.prompt), chat.subject)
        assert lookup == enc.subject_last and tokenizer.decode(ids[lookup]).strip() == "Tower"
        assert tokenizer.decode(ids[length - 1]) == "\n" and tokenizer.decode(ids[length:]) == ""  # 1-token target
    assert tokenizer.decode(problem.target) == "Rome"


def test_chat_edit_lands_on_the_wrapped_prompt(tokenizer, corpus_file, tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setenv("FACTEDIT_HOME", str(tmp_path / "home"))
    model = tiny_model("llama", hidden=256, intermediate=512)
    fmt = chat_format(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hp = ROMEHyperParams.for_model(
        model,
        layers=[1],
        mom2_n_tokens=2000,
        fact_token="last",  # a random 4-layer model does not carry a subject-token edit across ~30 tokens
        v_weight_decay=0.0,
        clamp_norm_factor=100.0,
        v_num_grad_steps=15,
    )
    report = edit_and_compare(
        model,
        tokenizer,
        EditRequest(REQUEST.prompt, REQUEST.subject, "Rome", target_true="Paris"),
        "rome",
        hp,
        paraphrases=["The Eiffel Tower stands in"],
        prompt_format=fmt,
        resources=EditResources(model, tokenizer, corpus=str(corpus_file)),
        templates=TEMPLATES,
    )
    request = report.requests[0]
    assert request.prompt == fmt.wrap(REQUEST.prompt) and request.new_text == "Rome"
    assert all(row.text.startswith(fmt.before) for row in report.rows)  # probes are wrapped too
    target = tokenizer("Rome", add_special_tokens=False)["input_ids"][0]
    ids = torch.tensor([tokenizer(request.text)["input_ids"]])
    with torch.no_grad():
        assert int(model(input_ids=ids).logits[0, -1].argmax()) == target
    for handle in report.applied:
        handle.revert()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- the command line and the evaluation runner, on the default model -----------------------------------------------
def test_predict_chat_reads_after_the_assistant_prefix(default_model):
    from factedit.predict import top_next_tokens

    from .test_cli import factedit

    text = "The Eiffel Tower is located in the city of"
    chat = factedit("predict", "--json", "--k", "3", "--chat", text)
    assert chat.returncode == 0, chat.stderr
    chat_top = json.loads(chat.stdout)[0]["top"]
    model, tok = default_model
    raw_top = top_next_tokens(model, tok, [text], 3)[0]
    assert raw_top[0][0] == " Paris"
    assert [t for t, _ in chat_top] == [t for t, _ in top_next_tokens(model, tok, [chat_format(tok).wrap(text)], 3)[0]]
    assert chat_top[0][0] != raw_top[0][0] and not chat_top[0][0].startswith(" ")  # a reply's first word: no space


def test_eval_records_the_prompt_formats(tmp_path, default_model, one_torch_thread):
    from factedit.evaluation.runner import read_manifest, run_evaluation

    model, tok = default_model
    # the formats recorded and checked on resume, not the generative scores (off: CI time)
    config = RunConfig(
        method="none", dataset="counterfact", n=1, prompts_edit="raw", prompts_eval="chat", generative=False
    )
    run_evaluation(model, tok, config, tmp_path / "run", model_name="smollm2-135m", progress=False)
    manifest = read_manifest(tmp_path / "run")
    fmt = chat_format(tok)
    assert manifest["prompts"] == {"edit": "raw", "eval": "chat", "chat": {"before": fmt.before, "after": fmt.after}}
    lines = [json.loads(line) for line in (tmp_path / "run" / "cases.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and all("post" in line for line in lines)
    # raw/raw: another run, refused on resume
    again = RunConfig(method="none", dataset="counterfact", n=1, generative=False)
    with pytest.raises(FactEditError, match="prompts"):
        run_evaluation(model, tok, again, tmp_path / "run", model_name="smollm2-135m", progress=False)


def test_generative_answers_under_chat_are_read_after_the_assistant_prefix(data_dir, default_model, one_torch_thread):
    """WILD's greedy answers of a chat-wrapped case: every prompt is the wrapped one, and an answer is the
    assistant's reply, ending at the end of its turn (a special token, not kept) or its first sentence."""
    from factedit.evaluation.cases import GenerativeSettings, generative_prompts, generative_scores
    from factedit.evaluation.generation import stop_token_ids

    model, tok = default_model
    fmt = chat_format(tok)
    case = load_counterfact(data_dir / "counterfact" / "counterfact_dev.json", n=1).cases[0].in_formats(fmt, fmt)
    prompts = generative_prompts(case)
    assert prompts and all(p.startswith(fmt.before) and p.endswith(fmt.after) for p in prompts)
    block = generative_scores(model, tok, case, GenerativeSettings(max_new_tokens=12))
    answers = [a for key in ("rewrite", "paraphrase", "neighborhood") for a in block[f"{key}_prompts_generated"]]
    assert len(answers) == len(prompts) and any(a["text"].strip() for a in answers)
    assert not any(set(a["ids"]) & stop_token_ids(tok) for a in answers)
    assert not any(fmt.after.strip() in a["text"] or "<|im" in a["text"] for a in answers)
