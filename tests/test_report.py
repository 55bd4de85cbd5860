"""``factedit report``: one offline HTML page, checked in headless Chromium (as the web app's browser test).

Two reports: a guarded sequential FT run on a tiny random model (drift points, a refused edit, greedy answers)
and copies of the first cases of the two ``state/`` runs, which are of the old format (no greedy answers, no
EasyEdit blocks). The screenshot is written to ``out/report/screenshot.png`` (a test artifact).
"""

from __future__ import annotations

import shutil

import pytest

from factedit.evaluation.report import write_report
from factedit.evaluation.runner import run_evaluation
from factedit.evaluation.summary import summarize_runs

from .conftest import REPO
from .headless_chromium import chromium_driver
from .test_guard import LIMIT, _config, data, model, tok  # noqa: F401 - fixtures shared with the guard tests

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCREENSHOT = REPO / "out" / "report" / "screenshot.png"
OLD_RUNS = ("counterfact_rome_keyfit", "counterfact_rome_docstart")


@pytest.fixture(scope="module")
def browser():
    yield from chromium_driver("1400,2400", "factedit-report-chromium-")


def _table(driver, table_id: str = "summary") -> list[list[str]]:
    rows = driver.find_elements("css selector", f"#{table_id} tr")
    return [[c.text for c in r.find_elements("css selector", "th, td")] for r in rows]


def _offline(page: str) -> None:
    """Nothing the page would fetch: no script at all, and every image is a data: URI."""
    assert "<script" not in page.lower()
    assert "http://" not in page and "https://" not in page.replace("https://rome.baulab.info", "")
    assert 'src="data:image/png;base64,' in page


def test_a_guarded_tiny_run_renders_its_table_drift_and_cases(model, tok, data, tmp_path, browser):  # noqa: F811
    run = tmp_path / "seq_ft_guarded"
    run_evaluation(model, tok, _config(data, **LIMIT), run, progress=False)
    page = write_report([run], tmp_path / "report", cases=3)
    text = page.read_text()
    _offline(text)
    summary = summarize_runs([run])
    browser.get(page.as_uri())
    table = _table(browser)
    assert table[0][:3] == ["run", "method", "n"] and "ES" in table[0] and table[0][-1] == "refused"
    views = _table(browser, "views")  # the other views beside ROME's: generative, EasyEdit's, cost
    assert views[0][:3] == ["run", "method", "n"] and "Gen ES" in views[0] and "EE rel" in views[0]
    assert [r[0] for r in views[1:]] == ["pre (unedited)", "seq_ft_guarded"] and "Gen ES" not in table[0]
    assert [r[0] for r in table[1:]] == ["pre (unedited)", "seq_ft_guarded"]
    es = summary.rows[-1].cells["ES"]
    assert table[2][table[0].index("ES")] in (
        f"{es.mean:.1f} ± {es.half:.1f}",
        f"{es.mean:.1f} [{es.low:.1f}, {es.high:.1f}]",
    )
    assert table[2][-1] == "1"
    images = browser.find_elements("css selector", "img")
    assert images and all(browser.execute_script("return arguments[0].naturalWidth", i) > 0 for i in images)
    assert any(i.get_attribute("title") == "drift" for i in images)
    cases = browser.find_elements("css selector", ".case")
    assert len(cases) == 3 and len(browser.find_elements("css selector", ".case.refused")) == 1
    assert "refused by the guard" in browser.find_element("css selector", ".case.refused").text
    assert "greedy answer" in cases[0].text and "before the edit" in cases[0].text
    assert (tmp_path / "report" / "drift.png").is_file()


def test_old_format_runs_render(tmp_path, browser):
    """The first 40 cases of the two state/ runs (read-only; copied), which predate greedy answers."""
    runs = []
    for name in OLD_RUNS:
        source = REPO / "state" / name
        if not source.is_dir():
            pytest.skip(f"{source} not found")
        target = tmp_path / name
        target.mkdir()
        shutil.copy(source / "manifest.json", target / "manifest.json")
        lines = (source / "cases.jsonl").read_text().splitlines()[:40]
        (target / "cases.jsonl").write_text("\n".join(lines) + "\n")
        runs.append(target)
    page = write_report(runs, tmp_path / "report", cases=4)
    _offline(page.read_text())
    browser.get(page.as_uri())
    table = _table(browser)
    assert [r[0] for r in table[1:]] == ["pre (unedited)", *OLD_RUNS]
    assert "ES" in table[0] and not any("Gen ES" in row for row in _table(browser, "views"))
    assert len(browser.find_elements("css selector", ".case")) == 8
    assert "no greedy answers recorded" in browser.find_element("css selector", ".case").text
    assert "no run has drift points" in browser.find_element("tag name", "body").text
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000
