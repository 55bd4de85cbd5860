"""Scale-out on torch.distributed (issue 16): two gloo processes give what one process gives.

Each test starts 2 processes with ``torch.multiprocessing`` (or ``torchrun`` for the command line), the
environment torchrun would set included, on a tiny random GGUF model (a few hundred tokens of vocabulary,
2 layers): nothing here loads the default model. Workers are module-level functions (spawned processes
import this module) and hand their results back through files in ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from typer.testing import CliRunner

from factedit import EditRequest, distributed
from factedit.cli.main import app
from factedit.editing.alphaedit import AlphaEditState, compute_alphaedit
from factedit.editing.hparams import AlphaEditHyperParams, MEMITHyperParams, ROMEHyperParams
from factedit.editing.memit import compute_memit
from factedit.editing.patch import Patch
from factedit.editing.resources import EditResources
from factedit.errors import FactEditError
from factedit.evaluation import RunConfig, run_evaluation
from factedit.evaluation.records import CASES, MANIFEST, read_cases
from factedit.evaluation.summary import load_run
from factedit.models.loading import load_model
from factedit.stats.corpus import open_corpus
from factedit.stats.second_moment import (
    SamplePlan,
    collect_second_moments,
    collect_second_moments_sharded,
    second_moments,
)

from .gguf_files import write_tiny_gguf

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORLD = 2
LAYERS = [0, 1]
# float32 sums over a different split of the same tokens, added in float64: rounding only (measured 1-2e-7;
# two different samples of the corpus differ by 0.13-0.18)
RTOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(world),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
    }


def _as_rank(rank: int, world: int, port: int, target, args: tuple) -> None:
    """What torchrun does for a worker: its environment; then the worker, then leave the group."""
    os.environ.update(_rank_env(rank, world, port))
    torch.set_num_threads(1)
    try:
        target(rank, *args)
    finally:
        distributed.destroy()


def spawn(target, *args, world: int = WORLD) -> None:
    """Run ``target(rank, *args)`` in ``world`` fresh processes joined like torchrun's; raises if one fails."""
    mp.start_processes(_as_rank, args=(world, _free_port(), target, args), nprocs=world, start_method="spawn")


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory) -> Path:
    """A tiny GGUF model file, in a home folder of this module (fresh caches, inherited by the workers);
    loading it once here fills the float32 cache the workers then read."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FACTEDIT_HOME", str(tmp_path_factory.mktemp("home")))
        path = tmp_path_factory.mktemp("model") / "tiny.gguf"
        write_tiny_gguf(path, "llama", matrix_type="F32")
        load_model(str(path))
        yield path


@pytest.fixture(scope="module")
def corpus_text(tmp_path_factory, corpus_file) -> Path:
    """The first 400 documents of the shared Wikipedia text, with a few blank lines (skipped by the corpus)."""
    lines = corpus_file.read_text().splitlines()[:400]
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n".join(line if i % 50 else "" for i, line in enumerate(lines)) + "\n")
    return path


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# -- the runtime layer --------------------------------------------------------------------------------------
def test_one_process_is_rank_zero_of_one(monkeypatch):
    for name in distributed.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert not distributed.launched() and not distributed.init()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.shard([5, 6, 7]) == [5, 6, 7]
    assert distributed.all_gather_objects("x") == ["x"] and distributed.on_main(lambda: 3, "testing") == 3
    assert distributed.shard(list(range(7)), 1, 3) == [1, 4]
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(FactEditError, match="malformed"):
        distributed.torchrun_env()


def test_sample_plan_picks_what_one_process_counts():
    # pools flush at min(remaining, 16 batches); a pool is taken shortest first; the cut takes a prefix
    plan = SamplePlan(n_tokens=10, batch_tokens=100)
    assert plan.add(0, 4) == [] and plan.add(1, 0) == []
    assert plan.add(2, 7) == [(0, 4), (2, 6)] and plan.done and plan.seen == 10
    short = SamplePlan(n_tokens=50, batch_tokens=100)
    assert short.add(0, 9) == [] and short.add(1, 3) == []
    assert short.end() == [(1, 3), (0, 9)] and short.seen == 12


# -- statistics ---------------------------------------------------------------------------------------------
def _stats_worker(rank: int, model_path: str, corpus: str, out: str) -> None:
    model, tok = load_model(model_path)
    text = open_corpus(corpus)
    distributed.init("cpu")
    small, seen = collect_second_moments_sharded(
        model, tok, LAYERS, text, n_tokens=3000, max_length=48, batch_tokens=128, progress=False
    )
    cached = second_moments(
        model, tok, LAYERS, corpus=text, n_tokens=2500, max_length=64, cache_folder=Path(out) / "stats", progress=False
    )
    torch.save({"small": small, "seen": seen, "cached": cached}, Path(out) / f"rank{rank}.pt")


def test_sharded_statistics_equal_one_process_and_share_its_cache(gguf_model, corpus_text, tmp_path):
    spawn(_stats_worker, str(gguf_model), str(corpus_text), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    model, tok = load_model(str(gguf_model))
    text = open_corpus(corpus_text)
    # small batches: many pools, and a sample cut inside a pool, as one process would cut it
    alone, seen = collect_second_moments(
        model, tok, LAYERS, text, n_tokens=3000, max_length=48, batch_tokens=128, progress=False
    )
    assert seen == 3000 and all(r["seen"] == 3000 for r in ranks)
    for layer in LAYERS:
        assert _relative_error(ranks[0]["small"][layer], alone[layer]) < RTOL
        assert torch.equal(ranks[0]["small"][layer], ranks[1]["small"][layer])  # every rank the same matrix
    # the cache file the ranks wrote is the one a single process looks up: it is read, not recomputed
    folder = tmp_path / "stats"
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == len(LAYERS)
    stamps = {f: f.stat().st_mtime_ns for f in files}
    reread = second_moments(
        model, tok, LAYERS, corpus=text, n_tokens=2500, max_length=64, cache_folder=folder, progress=False
    )
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    fresh = second_moments(model, tok, LAYERS, corpus=text, n_tokens=2500, max_length=64, cache=False, progress=False)
    for layer in LAYERS:
        assert torch.equal(reread[layer], ranks[1]["cached"][layer])
        assert _relative_error(reread[layer], fresh[layer]) < RTOL


# -- evaluation ---------------------------------------------------------------------------------------------
# ROME with a small sample and few steps: the statistics (computed by the ranks together when the run
# starts) and the templates are shared by every case, each case is edited from the unedited model.
ROME_FAST = {"mom2_n_tokens": 2000, "v_num_grad_steps": 4, "context_template_length_params": [[5, 2]]}


def _eval_config(n: int) -> RunConfig:
    # teacher-forced scores only: the generative answers are the same per-case code, and doubled the time
    return RunConfig(method="rome", dataset="counterfact", n=n, overrides=ROME_FAST, batch_size=16, generative=False)


def _eval_worker(rank: int, model_path: str, out: str, n: int, die_after: int | None) -> None:
    model, tok = load_model(model_path)
    finished = []

    def on_case(case_id: str, record: dict) -> None:
        finished.append(case_id)
        if rank == 1 and die_after is not None and len(finished) == die_after:
            os._exit(17)  # killed: no clean-up, no goodbye to the other rank

    report = run_evaluation(model, tok, _eval_config(n), out, on_case=on_case, progress=False)
    (Path(out) / f"report.rank{rank}.json").write_text(json.dumps([report.total, report.evaluated, report.errors]))


def _strip(records: dict[str, dict]) -> dict[str, dict]:
    """Per-case results without the timings (which differ between runs)."""
    return {key: {k: v for k, v in rec.items() if k != "timing"} for key, rec in records.items()}


def test_sharded_evaluation_matches_one_process_and_resumes_after_a_rank_dies(gguf_model, tmp_path):
    run = tmp_path / "sharded"
    # rank 1 dies after its first case; torch.multiprocessing then stops rank 0, as torchrun would
    with pytest.raises(mp.ProcessExitedException):
        spawn(_eval_worker, str(gguf_model), str(run), 6, 1)
    assert json.loads((run / MANIFEST).read_text())["world_size"] == WORLD
    partial = read_cases(run)
    assert 1 <= len(partial) < 6 and len(read_cases(run / "nothing")) == 0
    # the same command again: each rank takes a share of what is left
    spawn(_eval_worker, str(gguf_model), str(run), 6, None)
    reports = [json.loads((run / f"report.rank{r}.json").read_text()) for r in range(WORLD)]
    assert reports[0] == reports[1] == [6, 6 - len(partial), 0]
    logs = {p.name: [json.loads(line)["case_id"] for line in p.read_text().splitlines()] for p in run.glob("cases*")}
    assert set(logs) == {"cases.rank0.jsonl", "cases.rank1.jsonl"} and sum(map(len, logs.values())) == 6

    # one process, from scratch (it reads the statistics the ranks cached): the same per-case results
    model, tok = load_model(str(gguf_model))
    alone = tmp_path / "alone"
    run_evaluation(model, tok, _eval_config(6), alone, progress=False)
    expected = _strip(read_cases(alone))
    assert _strip(read_cases(run)) == expected
    assert all("error" not in r and r["edit"]["method"] == "rome" for r in expected.values())

    # the sharded run, extended by one process: the rank logs count as done, the new case goes to cases.jsonl
    report = run_evaluation(model, tok, _eval_config(7), run, progress=False)
    assert (report.already_done, report.evaluated) == (6, 1)
    assert len((run / CASES).read_text().splitlines()) == 1
    assert json.loads((run / MANIFEST).read_text())["world_size"] == 1
    assert len(load_run(run).cases) == 7  # summaries read every log


# -- MEMIT / AlphaEdit --------------------------------------------------------------------------------------
# tiny random models need these settings (tests/test_memit.py); one request per z chunk: 2 chunks per rank
MEMIT_SETTINGS = dict(
    fact_token="last", v_weight_decay=0.0, clamp_norm_factor=100.0, v_num_grad_steps=6, mom2_update_weight=1.0,
    mom2_n_tokens=2000, batch_size=1,
)  # fmt: skip
MEMIT_REQUESTS = [
    EditRequest("The {} is located in the city of", "Eiffel Tower", "Rome"),
    EditRequest("{} plays the sport of", "LeBron James", "football"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English"),
    EditRequest("{} is a citizen of", "Toko Yasuda", "Japan"),
]
TEMPLATES = ["{}", "Hello. {}", "In short, {}"]
# forward batches of 2 prompts: the 12 key prompts and the 4 current values of each layer are read in
# batches shared by both ranks, a request's templates split between ranks
KEY_BATCH = 2


def _batch_edits(model, tok, corpus: str) -> dict:
    """A MEMIT batch and an AlphaEdit batch (its state committed, as a sequence would) on the same requests."""
    hp = MEMITHyperParams.for_model(model, layers=LAYERS, **MEMIT_SETTINGS)
    memit = compute_memit(model, tok, MEMIT_REQUESTS, hp, templates=TEMPLATES, corpus=corpus, key_batch_size=KEY_BATCH)
    resources = EditResources(model, tok, corpus=corpus)
    moments = resources.second_moments(LAYERS, hp.stats_spec)
    threshold = max(float(torch.linalg.eigvalsh(c.double()).median()) for c in moments.values())
    ahp = AlphaEditHyperParams.for_model(
        model, layers=LAYERS, nullspace_threshold=threshold, L2=1e-3, **MEMIT_SETTINGS
    )  # fmt: skip
    state = AlphaEditState(moments, ahp)
    alpha = compute_alphaedit(
        model, tok, MEMIT_REQUESTS, ahp, state=state, templates=TEMPLATES, resources=resources,
        key_batch_size=KEY_BATCH,
    )  # fmt: skip
    state.commit()
    return {
        "memit": [e.delta() for e in memit.patch.entries],
        "losses": memit.losses,
        "alphaedit": [e.delta() for e in alpha.patch.entries],
        "state": state.state_dict(),
    }


def _memit_worker(rank: int, model_path: str, corpus: str, out: str) -> None:
    model, tok = load_model(model_path)
    torch.save({**_batch_edits(model, tok, corpus), "world": distributed.world_size()}, Path(out, f"m{rank}.pt"))


def test_sharded_memit_and_alphaedit_batches_give_the_same_patch(gguf_model, corpus_text, tmp_path):
    spawn(_memit_worker, str(gguf_model), str(corpus_text), str(tmp_path))
    ranks = [torch.load(tmp_path / f"m{r}.pt") for r in range(WORLD)]
    model, tok = load_model(str(gguf_model))
    alone = _batch_edits(model, tok, str(corpus_text))  # reads the statistics the ranks computed together
    assert ranks[0]["world"] == ranks[1]["world"] == WORLD  # compute_memit joined the ranks
    assert ranks[0]["losses"] == ranks[1]["losses"] == alone["losses"]  # every z optimised exactly as alone
    # z, keys and current values computed in the batches one process runs, the solve on rank 0, the same
    # statistics: bit for bit the patch of one process, on both ranks (with statistics computed apart instead,
    # float rounding in C moves the patch by ~2e-5 relative: docs/distributed.md)
    for kind in ("memit", "alphaedit"):
        for mine, d0, d1 in zip(alone[kind], ranks[0][kind], ranks[1][kind], strict=True):
            assert torch.equal(d0, d1) and torch.equal(d0, mine), kind
    # rank 1 did not solve, yet holds the same AlphaEdit state (the keys of the committed batch)
    assert alone["state"].keys() == ranks[1]["state"].keys() == {f"previous.{layer}" for layer in LAYERS}
    assert all(
        torch.equal(ranks[1]["state"][k], v) and torch.equal(ranks[0]["state"][k], v) for k, v in alone["state"].items()
    )
    # the batch size of the key passes only regroups the same prompts: float rounding (measured 2e-7 to 4e-6)
    hp = MEMITHyperParams.for_model(model, layers=LAYERS, **MEMIT_SETTINGS)
    one_pass = compute_memit(model, tok, MEMIT_REQUESTS, hp, templates=TEMPLATES, corpus=str(corpus_text))
    for entry, sharded in zip(one_pass.patch.entries, alone["memit"], strict=True):
        assert _relative_error(sharded, entry.delta()) < RTOL


# -- failure ------------------------------------------------------------------------------------------------
def _dying_worker(rank: int, out: str) -> None:
    distributed.init("cpu")
    distributed.barrier("starting")
    if rank == 1:
        os._exit(3)
    try:
        distributed.all_reduce_sum(torch.ones(3), "adding up the statistics of layer 0")
    except FactEditError as exc:
        Path(out, "rank0.txt").write_text(str(exc))


def test_a_rank_that_dies_gives_the_others_a_one_line_error(tmp_path):
    # joined by hand (not by spawn's join, which would stop rank 0 as soon as rank 1 is gone)
    context = mp.start_processes(
        _as_rank, args=(WORLD, _free_port(), _dying_worker, (str(tmp_path),)), nprocs=WORLD, start_method="spawn",
        join=False,
    )  # fmt: skip
    for process in context.processes:
        process.join(120)
    assert [p.exitcode for p in context.processes] == [0, 3]
    message = (tmp_path / "rank0.txt").read_text()
    assert message.startswith("rank 0 of 2: adding up the statistics of layer 0 failed") and "\n" not in message
    assert "run the same command again to resume" in message


# -- the command line ---------------------------------------------------------------------------------------
def test_torchrun_stats_command_fills_the_cache_one_process_reads(gguf_model, corpus_text, tmp_path):
    options = ["--model", str(gguf_model), "--layer", "0", "--layer", "1", "--corpus", str(corpus_text)]
    options += ["--tokens", "2000", "--max-length", "64"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}"]
    folder = Path(os.environ["FACTEDIT_HOME"]) / "stats"
    before = set(folder.glob("*.safetensors"))
    done = subprocess.run(
        [*command, "-m", "factedit", "stats", *options],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("layer 0: (128, 128)") == 1 and f"done by {WORLD} processes" in done.stdout
    model, tok = load_model(str(gguf_model))
    stamps = {f: f.stat().st_mtime_ns for f in set(folder.glob("*.safetensors")) - before}
    assert len(stamps) == len(LAYERS)
    reread = second_moments(model, tok, LAYERS, corpus=str(corpus_text), n_tokens=2000, max_length=64, progress=False)
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps and set(folder.glob("*.safetensors")) - before == set(
        stamps
    )  # read, not recomputed
    fresh = second_moments(
        model, tok, LAYERS, corpus=str(corpus_text), n_tokens=2000, max_length=64, cache=False, progress=False
    )
    for layer in LAYERS:
        assert _relative_error(reread[layer], fresh[layer]) < RTOL


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}"]
    return subprocess.run(
        [*command, "-m", "factedit", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def test_torchrun_edit_command_writes_one_patch_equal_to_one_process(gguf_model, corpus_text, tmp_path):
    model, _ = load_model(str(gguf_model))
    hparams = tmp_path / "memit.json"
    hparams.write_text(MEMITHyperParams.for_model(model, layers=LAYERS, **MEMIT_SETTINGS).model_dump_json())
    # 12 requests x 6 generated templates: two forward batches of keys per layer, six z chunks per rank
    requests = tmp_path / "requests.json"
    requests.write_text(
        json.dumps(
            [
                {"prompt": f"{{}} number {i} is a citizen of", "subject": f"Person {i}", "target": "Japan"}
                for i in range(12)
            ]
        )
    )
    options = ["--model", str(gguf_model), "--method", "memit", "--requests", str(requests), "--hparams", str(hparams)]
    options += ["--corpus", str(corpus_text)]
    done = _torchrun("edit", *options, "--save", str(tmp_path / "shared"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("patch saved to") == 1 and done.stdout.count("12 edits") == 1  # rank 0 reports
    assert [p.name for p in (tmp_path / "shared").iterdir()] == ["patch.safetensors"]  # written once, no leftovers

    alone = CliRunner().invoke(app, ["edit", *options, "--save", str(tmp_path / "alone")])
    assert alone.exit_code == 0, alone.output
    shared, single = (Patch.load(tmp_path / f / "patch.safetensors") for f in ("shared", "alone"))
    assert [e.name for e in shared.entries] == [e.name for e in single.entries] and len(shared.entries) == len(LAYERS)
    for mine, one in zip(shared.entries, single.entries, strict=True):
        assert torch.equal(mine.delta(), one.delta())
    assert shared.requests == single.requests and shared.base_fingerprint == single.base_fingerprint


def test_torchrun_edit_with_a_method_that_does_not_share_edits_on_rank_zero(gguf_model, corpus_text, tmp_path):
    model, _ = load_model(str(gguf_model))
    hparams = tmp_path / "rome.json"
    hparams.write_text(ROMEHyperParams.for_model(model, **ROME_FAST, mom2_dataset=str(corpus_text)).model_dump_json())
    options = [
        "--model",
        str(gguf_model),
        "--method",
        "rome",
        "--hparams",
        str(hparams),
        "--prompt",
        "{} is a citizen of",
    ]
    options += ["--subject", "Toko Yasuda", "--target", "Japan", "--true-target", "Canada"]
    done = _torchrun("edit", *options, "--save", str(tmp_path / "shared"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("patch saved to") == 1
    assert [p.name for p in (tmp_path / "shared").iterdir()] == ["patch.safetensors"]
    alone = CliRunner().invoke(app, ["edit", *options, "--save", str(tmp_path / "alone")])
    assert alone.exit_code == 0, alone.output
    shared, single = (Patch.load(tmp_path / f / "patch.safetensors") for f in ("shared", "alone"))
    assert len(shared.entries) == 1 and torch.equal(shared.entries[0].delta(), single.entries[0].delta())
