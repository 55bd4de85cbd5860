"""End to end in headless Chromium: predict, trace (heatmaps), edit Eiffel Tower -> Rome, revert.

The app runs under uvicorn on a free 127.0.0.1 port in a thread, over the session's
default model; Chromium is driven through Selenium and the Debian ``chromedriver``
(``.ci/run`` installs ``chromium`` and ``chromium-driver``). The screenshot is written
to ``out/web/screenshot.png`` (a test artifact; ``docs/img/web_app.png`` is a copy).
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from factedit.models.fingerprint import model_fingerprint  # noqa: E402
from factedit.web.app import create_app  # noqa: E402
from factedit.web.edits import edit_method_names  # noqa: E402

from .conftest import REPO  # noqa: E402
from .headless_chromium import chromium_driver  # noqa: E402
from .test_web_api import restore_model, web_overrides  # noqa: E402

SCREENSHOT = REPO / "out" / "web" / "screenshot.png"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(default_model, corpus_file):
    model, tok = default_model
    original = model_fingerprint(model)
    app = create_app(model, tok, hparams_overrides=web_overrides(corpus_file))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield app, f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    thread.join(30)
    app.state.jobs.shutdown(wait=True, timeout=60)
    restore_model(app, model, original)


@pytest.fixture(scope="module")
def browser():
    yield from chromium_driver("1440,1000", "factedit-chromium-")


def wait_for(driver, condition, timeout: float, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25).until(lambda d: condition(d))
    except TimeoutException:
        statuses = {
            s: driver.find_element("css selector", s).text
            for s in ("#predict-status", "#trace-status", "#edit-status", "#patch-status")
        }
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; page statuses: {statuses}") from None


def css(driver, selector: str):
    return driver.find_elements("css selector", selector)


def attr(driver, selector: str, name: str) -> str | None:
    """An attribute of the first match, read atomically in the page (re-rendered nodes never go stale)."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;",
        selector,
        name,
    )


def test_trace_edit_revert_in_chromium(server, browser, default_model):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select

    app, url = server
    model = default_model[0]
    base = model_fingerprint(model)
    d = browser
    d.get(url)
    wait_for(d, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1", 60, "page ready")
    assert "smollm2-135m" in [o.get_attribute("value") for o in css(d, "#model-select option")]
    # the method menu is the library's registry; each method shows only its own hyper-parameters
    assert [o.get_attribute("value") for o in css(d, "#method option")] == edit_method_names()
    assert d.find_element("id", "method").get_attribute("value") == "rome"
    d.find_element("id", "advanced").click()
    method = Select(d.find_element("id", "method"))
    method.select_by_value("ft")
    assert d.find_element("id", "hp-num_steps").is_displayed() and not d.find_element("id", "hp-v_lr").is_displayed()
    assert d.find_element("id", "hp-layers").get_attribute("placeholder") == "6"
    method.select_by_value("rome")
    assert d.find_element("id", "hp-v_lr").is_displayed() and not d.find_element("id", "hp-num_steps").is_displayed()

    # predictions of the unedited model
    d.find_element("id", "predict-btn").click()
    top1 = lambda d: attr(d, "#predictions tr[data-top1]", "data-top1")  # noqa: E731
    wait_for(d, lambda d: top1(d) == " Paris", 60, "Paris predicted")

    # causal trace: three SVG heatmaps, tokens x layers cells, hover tooltip
    samples = d.find_element("id", "trace-samples")
    samples.clear()
    samples.send_keys("2")
    d.find_element("id", "trace-btn").click()
    wait_for(d, lambda d: len(css(d, "#heatmap-attn svg rect.cell")) >= 30, 300, "heatmaps rendered")
    for kind in ("hidden", "mlp", "attn"):
        cells = css(d, f"#heatmap-{kind} svg rect.cell")
        assert len(cells) % 30 == 0 and len(cells) >= 30 * 9, (kind, len(cells))
    cell = css(d, "#heatmap-hidden svg rect.cell")[30 * 4 + 3]  # token 4 ("Tower"), layer 3
    ActionChains(d).move_to_element(cell).perform()
    tip = d.find_element("id", "tooltip")
    wait_for(d, lambda d: tip.is_displayed() and "layer 3" in tip.text, 10, "hover tooltip")
    assert "token 4" in tip.text and "p = " in tip.text

    # edit Eiffel Tower -> Rome (ROME's defaults but 8 value steps, set in the advanced settings:
    # Rome at p = 0.97 already, in 2/5 of the time)
    steps = d.find_element("id", "hp-v_num_grad_steps")
    steps.clear()
    steps.send_keys("8")
    gen = d.find_element("id", "generate-tokens")
    gen.clear()
    gen.send_keys("8")
    assert d.find_element("id", "target").get_attribute("value") == "Rome"
    d.find_element("id", "edit-btn").click()
    prompt_row = "#edit-results tr[data-kind='prompt']"
    wait_for(d, lambda d: attr(d, prompt_row, "data-after-top1") is not None, 900, "edit results")
    assert attr(d, prompt_row, "data-before-top1") == " Paris"
    assert attr(d, prompt_row, "data-after-top1") == " Rome"
    assert attr(d, "#edit-verdict", "data-landed") == "1"  # the report's verdict, in one line
    assert "top prediction: yes" in d.find_element("id", "edit-verdict").text
    wait_for(d, lambda d: top1(d) == " Rome", 60, "prediction panel shows Rome")
    assert len(css(d, "#patch-list tr[data-patch-id]")) == 1
    assert app.state.session.patches[0].patch.hparams["v_num_grad_steps"] == 8  # the page's setting was used
    assert d.find_element("id", "gen-after").text.startswith("The Eiffel Tower is located in the city of")
    assert model_fingerprint(model) != base

    # full-page screenshot as a test artifact
    height = d.execute_script("return document.documentElement.scrollHeight")
    d.set_window_size(1440, min(int(height) + 40, 6000))
    d.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.3)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert d.save_screenshot(str(SCREENSHOT))
    assert Path(SCREENSHOT).stat().st_size > 10_000

    # revert: the original prediction is back, the weights too
    d.find_element("css selector", "#patch-list .revert-btn").click()
    wait_for(d, lambda d: not css(d, "#patch-list tr[data-patch-id]"), 120, "patch list empty")
    wait_for(d, lambda d: top1(d) == " Paris", 60, "Paris predicted again")
    assert model_fingerprint(model) == base
    assert not app.state.session.patches
    assert "memory only" in d.find_element("id", "persist-status").text  # this app saves nothing: it says so

    # a long trace is cancelled from the page: it stops at its next step and the status says so
    samples.clear()
    samples.send_keys("50")
    d.find_element("id", "trace-btn").click()
    cancel = d.find_element("id", "trace-cancel")
    wait_for(d, lambda d: cancel.is_displayed(), 60, "cancel button shown")
    cancel.click()
    status = d.find_element("id", "trace-status")
    wait_for(d, lambda d: "cancelled" in status.text, 120, "trace cancelled")
    assert not cancel.is_displayed() and model_fingerprint(model) == base
