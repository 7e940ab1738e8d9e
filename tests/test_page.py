"""The drawing page at GET /, in headless Chromium (Debian's) driven by Playwright.

Screenshots of each state go to test-output/screenshots/ for a reviewer to look at."""

import shutil
import time
from pathlib import Path

import pytest
import requests
from conftest import ROOT, LiveGateway
from drawings import draw_digit

CHROMIUM = "/usr/bin/chromium"
SHOTS = ROOT / "test-output" / "screenshots"

pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists(),
                                reason="Debian's chromium is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    page.goto(url + "/")
    page.get_by_test_id("models").filter(has_text="bard v1").wait_for()
    return page


@pytest.fixture
def page(browser, gateway):
    page = open_page(browser, gateway.url)
    yield page
    page.close()


@pytest.fixture(scope="module")
def one_character_events(gateway):
    """The same models behind a gateway that streams one character per event, each its own model
    call: with the tiny test model, 40-character events came so fast that the browser sometimes
    read a whole stream at once, and the page could not show it growing."""
    live = LiveGateway(Path(gateway.settings.model_dir), stream_chunk_chars=1)
    live.wait_for_model("bard")
    yield live
    live.close()


def stroke(page, points):
    """Draw one stroke with the mouse through `points`, given in a 0..100 box on the canvas."""
    box = page.get_by_test_id("digit-canvas").bounding_box()
    at = [(box["x"] + x * box["width"] / 100, box["y"] + y * box["height"] / 100) for x, y in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for a, b in zip(at, at[1:], strict=False):
        for i in range(1, 9):  # intermediate moves, as a real hand makes
            page.mouse.move(a[0] + (b[0] - a[0]) * i / 8, a[1] + (b[1] - a[1]) * i / 8)
    page.mouse.up()


def shown_digit(page) -> str:
    result = page.get_by_test_id("digit-result")
    result.locator("strong").wait_for()
    return result.get_attribute("data-digit")


def test_page_needs_nothing_from_outside(gateway):
    html = requests.get(gateway.url + "/", timeout=10).text
    assert "http://" not in html and "https://" not in html  # no CDN, no external fonts
    for asset in ("/static/app.js", "/static/style.css"):
        assert requests.get(gateway.url + asset, timeout=10).status_code == 200


def test_drawing_a_one_and_a_seven_with_the_mouse(page):
    page.screenshot(path=SHOTS / "01-empty.png")
    stroke(page, [(50, 15), (52, 85)])
    assert shown_digit(page) == "1"
    page.screenshot(path=SHOTS / "02-one.png")

    page.get_by_test_id("clear").click()
    assert page.get_by_test_id("digit-result").inner_text() == "Draw a digit above."
    stroke(page, [(25, 18), (75, 18), (42, 88)])
    page.wait_for_function("document.querySelector('[data-testid=digit-result]').dataset.digit === '7'")
    assert shown_digit(page) == "7"
    assert page.locator("#bars li").count() == 10
    page.screenshot(path=SHOTS / "03-seven.png")


def test_uploading_a_png_shows_its_digit(page, tmp_path):
    drawing = tmp_path / "three.png"
    draw_digit(3).save(drawing)
    page.get_by_test_id("upload").set_input_files(str(drawing))
    page.wait_for_function("document.querySelector('[data-testid=digit-result]').dataset.digit !== undefined")
    assert shown_digit(page) == "3"
    page.screenshot(path=SHOTS / "04-upload.png")


@pytest.fixture
def streaming_page(browser, one_character_events):
    page = open_page(browser, one_character_events.url)
    yield page
    page.close()


def test_generated_text_streams_into_the_page_and_equals_the_api_text(streaming_page, one_character_events):
    page = streaming_page
    page.evaluate("""() => {
        window.lengths = [];
        new MutationObserver(() => window.lengths.push(
            document.querySelector('[data-testid=generated-text]').textContent.length))
          .observe(document.querySelector('[data-testid=generated-text]'),
                   {childList: true, characterData: true, subtree: true});
    }""")
    page.get_by_test_id("prompt").fill("ROMEO:")
    page.get_by_test_id("max-chars").fill("300")  # 300 events, 300 model calls
    page.get_by_test_id("seed").fill("21")
    page.get_by_test_id("generate").click()
    page.get_by_test_id("text-status").filter(has_text="Written by bard v1").wait_for()
    shown = page.get_by_test_id("generated-text").text_content()
    expected = requests.post(one_character_events.url + "/v1/text/generate", timeout=60, json={
        "prompt": "ROMEO:", "max_chars": 300, "temperature": 0.8, "seed": 21}).json()["text"]
    assert shown == expected
    growth = [n for n in page.evaluate("window.lengths") if n > 0]
    assert len(set(growth)) >= 3  # it grew over several events, not all at once
    page.screenshot(path=SHOTS / "05-generated.png")


def test_the_seed_the_page_shows_reproduces_its_text(page, gateway):
    """A random seed is one a JavaScript number holds exactly: the seed the page shows for a
    generation asked without one gives the same text again, through the API and through the
    page."""
    page.get_by_test_id("prompt").fill("KING:")
    page.get_by_test_id("max-chars").fill("120")
    page.get_by_test_id("seed").fill("")
    page.get_by_test_id("generate").click()
    status = page.get_by_test_id("text-status").filter(has_text="Written by bard v1")
    status.wait_for()
    seed = int(status.text_content().split("seed ")[1].rstrip("."))
    shown = page.get_by_test_id("generated-text").text_content()
    again = requests.post(gateway.url + "/v1/text/generate", timeout=60, json={
        "prompt": "KING:", "max_chars": 120, "temperature": 0.8, "seed": seed}).json()
    assert again["text"] == shown and again["seed"] == seed
    page.get_by_test_id("seed").fill(str(seed))
    page.get_by_test_id("generate").click()
    page.get_by_test_id("text-status").filter(has_text=f"seed {seed}.").wait_for()
    assert page.get_by_test_id("generated-text").text_content() == shown


def test_stop_cancels_a_generation(browser, trained, trained_bard, tmp_path):
    from conftest import copy_model_base

    base = copy_model_base(trained, tmp_path / "models")
    copy_model_base(trained_bard, base)
    slow = LiveGateway(base, stream_chunk_chars=2)  # 1,000 model calls for 2,000 characters
    try:
        slow.wait_for_model("bard")
        slow.wait_for_model("digits")
        page = browser.new_page()
        page.goto(slow.url + "/")
        page.get_by_test_id("max-chars").fill("2000")
        page.get_by_test_id("generate").click()
        page.wait_for_function(
            "document.querySelector('[data-testid=generated-text]').textContent.length > 20")
        page.get_by_test_id("stop").click()
        page.get_by_test_id("text-status").filter(has_text="Stopped.").wait_for()
        stopped_at = len(page.get_by_test_id("generated-text").text_content())
        time.sleep(1)
        assert len(page.get_by_test_id("generated-text").text_content()) == stopped_at < 2000
        assert page.get_by_test_id("generate").is_enabled()
        page.screenshot(path=SHOTS / "06-stopped.png")
        page.close()
    finally:
        slow.close()


def test_phone_width_and_unavailable_model_are_shown(browser, trained):
    live = LiveGateway(trained.model_base)  # no bard version: the page says so
    try:
        live.wait_for_model("digits")
        page = browser.new_page(viewport={"width": 390, "height": 844})
        page.goto(live.url + "/")
        page.get_by_test_id("models").filter(has_text="bard: not available").wait_for()
        canvas = page.get_by_test_id("digit-canvas").bounding_box()
        assert canvas["width"] <= 390
        page.keyboard.press("Tab")
        focused = page.evaluate("document.activeElement.dataset.testid")
        assert focused in ("clear", "upload", "digit-canvas")
        page.screenshot(path=SHOTS / "07-phone.png", full_page=True)
        page.close()
    finally:
        live.close()


def test_a_model_pushed_while_the_page_is_open_appears_by_itself(browser, trained, trained_bard, tmp_path):
    """make run serves as soon as digits has a version and trains bard meanwhile: the page says
    bard is not there yet, then shows it, and writes, without a reload or a restart."""
    from conftest import copy_model_base

    from training.push import push_version

    base = copy_model_base(trained, tmp_path / "models")
    live = LiveGateway(base)
    try:
        live.wait_for_model("digits")
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        page.goto(live.url + "/")
        page.get_by_test_id("models").filter(has_text="bard: not available yet").wait_for()
        push_version(trained_bard.version_dir, base / "bard")
        page.get_by_test_id("models").filter(has_text="bard v1").wait_for(timeout=60_000)
        page.get_by_test_id("prompt").fill("ROMEO:")
        page.get_by_test_id("max-chars").fill("40")
        page.get_by_test_id("generate").click()
        page.get_by_test_id("text-status").filter(has_text="Written by bard v1").wait_for()
        assert len(page.get_by_test_id("generated-text").text_content()) == 40
        page.close()
    finally:
        live.close()


def test_the_page_shows_every_trained_rung_reading_one_drawing_top_rung_first(browser, ladder):
    live, *_ = ladder
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    try:
        page.goto(live.url + "/")
        page.get_by_test_id("ladder-models").filter(has_text="softmax v1").wait_for()
        header = page.get_by_test_id("ladder-models").inner_text()
        assert header == "ladder: conv-dropout v1, conv v1, dense v1, softmax v1"
        stroke(page, [(50, 15), (52, 85)])
        page.locator("#ladder li").nth(4).wait_for()
        rungs = page.locator("#ladder li").evaluate_all("items => items.map(i => i.dataset.rung)")
        assert rungs == ["bn", "conv-dropout", "conv", "dense", "softmax"]
        digits = page.locator("#ladder li").evaluate_all("items => items.map(i => i.dataset.digit)")
        assert all(d is not None and d.isdigit() for d in digits), digits
        assert digits[0] == page.get_by_test_id("digit-result").get_attribute("data-digit") == "1"
        page.screenshot(path=SHOTS / "08-ladder.png")
        page.get_by_test_id("clear").click()
        assert page.locator("#ladder li").count() == 0
    finally:
        page.close()
