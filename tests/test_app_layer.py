"""The application layer on tiny random models: one registry, shared resources, one report, progress."""

from __future__ import annotations

import os

import pytest
import torch

from factedit import EditRequest, EditResources, FactEditError, edit_and_compare, get_method, method_names
from factedit.editing.hparams import StatsSpec, TemplateSpec
from factedit.progress import Progress
from factedit.stats.corpus import open_corpus

from .tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Random tiny models need the settings explained in test_families.py (edit at the last token,
# no weight decay, loose clamp); statistics from a small sample keep the test short.
VALUE = dict(fact_token="last", v_weight_decay=0.0, clamp_norm_factor=100.0, v_num_grad_steps=15, mom2_n_tokens=4000)
OVERRIDES = {
    "rome": dict(layers=[1], **VALUE),
    "rome-original": dict(layers=[1], **VALUE),
    "memit": dict(layers=[1, 2], mom2_update_weight=1.0, **VALUE),
    "alphaedit": dict(layers=[1, 2], mom2_update_weight=1.0, L2=1e-3, **VALUE),  # threshold set in the test
    "ft": dict(layers=[1], num_steps=40, lr=5e-2),
    "ft-l": dict(layers=[1], num_steps=40, lr=5e-2, norm_constraint=5e-2),
    "emmet": dict(layers=[1, 2], mom2_update_weight=1.0, **VALUE),
    "ultraedit": dict(layers=[1, 2], lr=1e-3),  # no value optimisation: VALUE's keys do not apply
}
EIFFEL = EditRequest("The {} is located in the city of", "Eiffel Tower", target="Rome", target_true="Paris")
LEBRON = EditRequest("{} plays the sport of", "LeBron James", target="football", target_true="basketball")


class Recorder(Progress):
    """Remembers every stage the core reports and how far it got."""

    def __init__(self) -> None:
        self.stages: list[tuple[str, float | None]] = []
        self.done: dict[str, float] = {}

    def on_start(self, stage):
        self.stages.append((stage.name, stage.total))

    def on_advance(self, stage, info):
        self.done[stage.name] = stage.done


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return tiny_model("llama", hidden=256, intermediate=512), tokenizer


@pytest.fixture(scope="module")
def resources(tiny, corpus_file):
    model, tok = tiny
    return EditResources(model, tok, corpus=corpus_file)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, weights) -> bool:
    return all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_one_registry_names_every_method_with_its_capabilities():
    assert method_names() == ["none", "rome", "rome-original", "memit", "alphaedit", "ft", "ft-l", "emmet", "ultraedit"]
    assert [m for m in method_names() if get_method(m).capabilities.batch] == [
        "none",
        "memit",
        "alphaedit",
        "emmet",
        "ultraedit",
    ]
    assert [m for m in method_names() if get_method(m).capabilities.state] == ["alphaedit", "ultraedit"]
    assert [m for m in method_names() if get_method(m).capabilities.each] == ["ft", "ft-l"]
    assert [m for m in method_names() if get_method(m).capabilities.sharded] == ["memit", "alphaedit", "emmet"]
    with pytest.raises(FactEditError, match="unknown method 'banana'.*rome-original"):
        get_method("banana")


def test_method_names_fix_what_they_imply(tiny):
    model, _ = tiny
    assert get_method("rome").hparams(model, overrides={"layers": [1]}).consistent_key is True
    # the name wins over a file or override that says otherwise
    assert (
        get_method("rome-original").hparams(model, overrides={"layers": [1], "consistent_key": True}).consistent_key
        is False
    )
    original = get_method("rome-original").hparams(model, overrides={"layers": [1], "key_fit": "every_template"})
    assert original.key_fit == "mean" and get_method("rome").hparams(model, overrides={"layers": [1]}).key_fit == (
        "every_template"
    )
    with pytest.raises(FactEditError, match="takes no hyper-parameters"):
        get_method("none").hparams(model, overrides={"layers": [1]})
    with pytest.raises(FactEditError, match="one request at a time"):
        get_method("rome").check_requests([EIFFEL, LEBRON], None)


@pytest.mark.parametrize("name", [m for m in OVERRIDES])
def test_every_method_edits_through_one_report_and_reverts_bit_exact(tiny, resources, name):
    model, tok = tiny
    before = _weights(model)
    overrides = dict(OVERRIDES[name])
    if name == "alphaedit":  # half of the key space counts as "preserved" on this random model
        c = resources.second_moments([1, 2], StatsSpec(n_tokens=4000))
        overrides["nullspace_threshold"] = float(max(torch.linalg.eigvalsh(c[lyr].double()).median() for lyr in c))
    batch = get_method(name).capabilities.batch
    requests = [EIFFEL, LEBRON] if batch else [EIFFEL]
    recorder = Recorder()
    report = edit_and_compare(
        model,
        tok,
        requests,
        name,
        overrides=overrides,
        resources=resources,
        paraphrases=["Where is the Eiffel Tower? In the city of"] if not batch else (),
        neighbours=["The Louvre is located in the city of"] if not batch else (),
        templates=["{}", "Hello. {}"],
        progress=recorder,
    )  # FT takes no templates: unused
    assert report.method == name and len(report.applied) == 1 and len(report.converged) == len(requests)
    kinds = [r.kind for r in report.rows]
    assert kinds == (["prompt", "prompt"] if batch else ["prompt", "paraphrase", "neighbour"])
    assert all(row.after is not None for row in report.rows)
    if name in ("rome", "rome-original", "memit", "alphaedit", "ft", "emmet", "ultraedit"):
        assert all(report.landed), (name, report.summary_line())
    # (convergence is judged by the target's probability, which stays tiny on a random model's flat
    # distribution even when the target becomes top-1: tests/test_rome_default.py checks it on a real model)
    assert all(isinstance(c, bool) for c in report.converged)
    assert "top prediction" in report.summary_line()
    data = report.to_dict()
    assert data["method"] == name and len(data["before"]) == len(data["after"]) == len(report.rows)
    assert recorder.stages, "the core reported no progress"
    report.applied[0].revert()
    assert _same(model, before)


def test_resources_compute_once_and_prefer_the_unedited_weights(tiny, resources):
    model, tok = tiny
    spec = StatsSpec(corpus=resources.corpus, n_tokens=4000)
    templates = TemplateSpec(length_params=((3, 2),), seed=1)
    first = resources.second_moments([1], spec)
    assert resources.second_moments([1], spec)[1] is first[1]  # memory hit, no recomputation
    made = resources.templates(templates)
    report = edit_and_compare(
        model, tok, EIFFEL, "rome", overrides=OVERRIDES["rome"], resources=resources, templates=["{}"]
    )
    try:
        # statistics and templates of the unedited weights are still the ones given while edited
        assert resources.second_moments([1], spec)[1] is first[1]
        assert resources.templates(templates) == made
        # one the unedited model never gave is computed on the current weights and kept under theirs
        other = resources.second_moments([3], spec)
        assert (resources.base_fingerprint, spec, 3) not in resources._moments
        assert any(key[1:] == (spec, 3) for key in resources._moments) and other[3].shape[0] == other[3].shape[1]
    finally:
        report.applied[0].revert()


def test_a_cached_corpus_id_needs_no_read(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTEDIT_HOME", str(tmp_path / "home"))
    corpus = tmp_path / "text.txt"
    corpus.write_text("one document\nanother document\n")
    first = open_corpus(corpus)
    content_id = first.corpus_id  # reads and hashes the file once, and records the hash
    again = open_corpus(corpus)
    assert again.corpus_id == content_id and again._documents is None  # id known without reading
    assert again.documents == ["one document", "another document"]
    corpus.write_text("changed text, other size\n")
    assert open_corpus(corpus).corpus_id != content_id


def test_requests_take_target_as_the_one_name():
    assert EditRequest(prompt="The {} is in", subject="X", target="Rome").target_new == "Rome"
    assert EditRequest("The {} is in", "X", "Rome").target == "Rome"
    with pytest.raises(FactEditError, match="new target"):
        EditRequest(prompt="The {} is in", subject="X")
    with pytest.raises(FactEditError, match="once"):
        EditRequest(prompt="The {} is in", subject="X", target="Rome", target_new="Oslo")


def test_sequence_through_the_report_records_drift_and_reverts(tiny, resources):
    model, tok = tiny
    before = _weights(model)
    report = edit_and_compare(
        model,
        tok,
        [EIFFEL, LEBRON],
        "memit",
        overrides=OVERRIDES["memit"],
        resources=resources,
        sequential=True,
        batch_size=1,
        templates=["{}"],
    )
    assert [(d["step"], d["edits"]) for d in report.drift] == [(1, 1), (2, 2)]
    assert report.drift[0]["edits_holding"] == 1.0 and len(report.applied) == 2
    assert os.environ.get("FACTEDIT_DATA_DIR")  # statistics came from the shared corpus
    assert len(report.stack) == 2
    report.stack.revert_all()  # one snapshot of the touched weights, not one copy per step
    assert _same(model, before)
    with pytest.raises(FactEditError, match="batch size"):
        edit_and_compare(
            model,
            tok,
            [EIFFEL],
            "memit",
            overrides=OVERRIDES["memit"],
            resources=resources,
            sequential=True,
            batch_size=0,
        )
    assert _same(model, before)
