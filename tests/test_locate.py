"""``factedit locate``: the layer rule and the sweep on a tiny model, whose "known facts" are prompts it
completes with its own top token (a random model knows nothing else), end to end through the real
trace, the real ROME evaluation runs and the hyper-parameter files they write."""

from __future__ import annotations

import json

import pytest

from factedit.editing.hparams import MEMITHyperParams, ROMEHyperParams
from factedit.errors import FactEditError
from factedit.evaluation.locate import (
    LocateSettings,
    best_of_sweep,
    locate,
    memit_layers_around,
    sweep_layers,
)
from factedit.predict import top_next_tokens

from .tiny_models import tiny_model

SUBJECTS = ["Eiffel Tower", "Danielle Darrieux", "Toko Yasuda", "Apple A5", "Autonomous University of Madrid"]


def test_memit_layers_follow_gpt_j_share_of_depth():
    assert memit_layers_around(5, 28) == [2, 3, 4, 5, 6, 7]  # 6 of 28 layers, as official MEMIT on GPT-J
    assert memit_layers_around(4, 30) == [1, 2, 3, 4, 5, 6]
    assert memit_layers_around(0, 24) == [0, 1, 2, 3, 4]  # clamped at the first layer
    assert memit_layers_around(11, 12) == [9, 10, 11]  # and at the last
    assert memit_layers_around(1, 4) == [0, 1]  # at least two layers


def test_sweep_and_best_layer_rule():
    assert sweep_layers(1, 2, 4) == [0, 1, 2, 3]
    assert sweep_layers(10, 1, 30) == [9, 10, 11]
    rows = [{"layer": 3, "S": 80.0}, {"layer": 4, "S": 85.0}, {"layer": 5, "S": 85.0}, {"layer": 6, "S": 70.0}]
    assert best_of_sweep(rows, 5) == 5  # a tie goes to the layer nearer the rule's
    assert best_of_sweep(rows, 3) == 4
    with pytest.raises(FactEditError, match="radius"):
        LocateSettings(radius=40).check()
    with pytest.raises(FactEditError, match="sweep_cases"):
        LocateSettings(sweep_cases=0).check()


def _write_knowns(model, tokenizer, path) -> None:
    """Known facts of this (random) model: each subject's prompt with the model's own top answer."""
    prompts = [f"{s} is located in the city of" for s in SUBJECTS]
    tops = top_next_tokens(model, tokenizer, prompts, 1)
    knowns = [
        {"known_id": i, "subject": s, "prompt": p, "attribute": top[0][0].strip() or top[0][0]}
        for i, (s, p, top) in enumerate(zip(SUBJECTS, prompts, tops, strict=True))
        if top[0][0].strip()
    ]
    path.write_text(json.dumps(knowns))


def test_locate_end_to_end_on_a_tiny_model(tokenizer, data_dir, tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setenv("FACTEDIT_HOME", str(tmp_path / "home"))
    model = tiny_model("llama")
    _write_knowns(model, tokenizer, tmp_path / "knowns.json")
    settings = LocateSettings(
        n_facts=3,
        samples=2,
        window=2,
        radius=1,
        sweep_cases=2,
        sweep_start=0,
        knowns_path=str(tmp_path / "knowns.json"),
        overrides={"mom2_n_tokens": 2000},
    )
    report = locate(model, tokenizer, tmp_path / "out", settings)

    assert report.num_layers == 4 and report.n_facts >= 1
    assert [row["layer"] for row in report.trace] == [0, 1, 2, 3]
    assert report.rule_layer == max(report.trace, key=lambda row: row["mean"])["layer"]
    assert [row["layer"] for row in report.sweep] == sweep_layers(report.rule_layer, 1, 4)
    assert all({"ES", "PS", "NS", "S"} <= set(row) for row in report.sweep)
    assert report.best_layer == best_of_sweep(report.sweep, report.rule_layer)

    rome = ROMEHyperParams.from_json(tmp_path / "out" / "rome.json")
    memit = MEMITHyperParams.from_json(tmp_path / "out" / "memit.json")
    assert rome.layers == [report.best_layer] and memit.layers == report.memit_layers
    assert rome.mom2_n_tokens == memit.mom2_n_tokens == 2000  # the sweep's settings are the files' settings
    saved = json.loads((tmp_path / "out" / "locate.json").read_text())
    assert saved["rule_layer"] == report.rule_layer and saved["sweep"] == report.sweep

    # a rerun resumes: the trace and every sweep layer are already done, and the answer is the same
    again = locate(model, tokenizer, tmp_path / "out", settings)
    assert again.sweep == report.sweep and again.rule_layer == report.rule_layer


def test_locate_can_trace_with_first_order_estimates(tokenizer, data_dir, tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setenv("FACTEDIT_HOME", str(tmp_path / "home"))
    model = tiny_model("qwen2")
    _write_knowns(model, tokenizer, tmp_path / "knowns.json")
    common = dict(n_facts=3, samples=2, window=1, radius=0, sweep_cases=1, sweep_start=0)
    settings = LocateSettings(
        **common, knowns_path=str(tmp_path / "knowns.json"), overrides={"mom2_n_tokens": 2000}, approx=True
    )
    report = locate(model, tokenizer, tmp_path / "approx", settings)
    assert [row["layer"] for row in report.trace] == [0, 1, 2, 3]
    assert report.rule_layer == max(report.trace, key=lambda row: row["mean"])["layer"]
    saved = json.loads((tmp_path / "approx" / "locate.json").read_text())
    assert saved["settings"]["approx"] is True
    effects = json.loads(next((tmp_path / "approx" / "trace").rglob("effects.json")).read_text())
    assert "attribution" in json.dumps(effects)  # the trace says its numbers are estimates
