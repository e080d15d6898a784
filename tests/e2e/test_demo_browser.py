"""tools/demo.py in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by Selenium.

The demo runs as users start it (`python tools/demo.py --cfg configs/tiny.yaml --port N`) on a free port of
127.0.0.1; the test uploads a real photo, segments it, checks the four panels and the downloads, highlights
a mask, names the masks with a vocabulary, uploads a file that is not an image, and stops the server.
"""

import io
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from skimage import data

from conftest import REPO, TINY

pytest.importorskip("gradio", reason="the demo needs the demo extra: pip install -e '.[demo]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra: pip install -e '.[dev]'")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs a headless Chromium and its driver; on Debian or Ubuntu: "
           "sudo apt-get update && sudo apt-get install -y chromium chromium-driver (README.md, Tests)")

STARTUP_S = 240  # importing torch and Gradio and building the miniature models, on a loaded 2-core machine
RUN_S = 240  # one segmentation of the miniature model
FAST = ["segmentor.resolution=128", "segmentor.denoise_steps=5"]  # the miniature model, a little faster
VOCABULARY = ("sky", "grass", "person")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The demo as a user starts it, on a free port of 127.0.0.1; terminated at the end (its log kept on failure)."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "demo.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, str(REPO / "tools" / "demo.py"), "--cfg", str(TINY), "--port",
                                    str(port), *FAST], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"the demo exited with status {process.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the demo did not answer on {url} within {STARTUP_S} s:\n{log.read_text()}")
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    output = log.read_text()
    assert process.returncode == 0, output  # SIGTERM stops the demo cleanly...
    workdir = re.search(r"results are written under (\S+)", output).group(1)
    assert not Path(workdir).exists()  # ...and it removes the downloads it wrote


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def loaded_images(driver, panel: str) -> list:
    """The <img> elements of a panel whose picture has loaded (a non-empty source with a natural width)."""
    return [img for img in driver.find_elements(By.CSS_SELECTOR, f"#{panel} img")
            if img.get_attribute("src") and img.get_property("complete") and img.get_property("naturalWidth") > 0]


def legend(driver, panel: str) -> list:
    return [item for item in driver.find_elements(By.CSS_SELECTOR, f"#{panel} .legend-item")]


def wait(driver, seconds: float, condition, what: str):
    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.5).until(lambda d: condition(d))
    except TimeoutException:
        toasts = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]")]
        pytest.fail(f"timed out waiting for {what}; messages on the page: {toasts}")


def download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        return response.read()


def test_the_demo_segments_an_uploaded_photo_in_the_browser(server, browser, tmp_path):
    photo = Image.fromarray(data.astronaut())
    photo.thumbnail((192, 192))
    photo.save(tmp_path / "astronaut.png")
    (tmp_path / "notes.png").write_text("not a picture")

    browser.get(server)
    wait(browser, 60, lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"), "the upload field")
    browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(tmp_path / "astronaut.png"))
    wait(browser, 60, lambda d: loaded_images(d, "panel-photo"), "the photo preview")

    browser.find_element(By.ID, "segment").click()
    panels = ("panel-photo", "panel-kmeans", "panel-bilinear", "panel-emerdiff")
    wait(browser, RUN_S, lambda d: all(loaded_images(d, p) for p in panels[1:]) and d.find_elements(
        By.CSS_SELECTOR, "#downloads a[href]"), "the four panels and the downloads")
    for panel in panels[1:]:  # the photo under one translucent layer per mask, a legend entry per mask
        assert len(loaded_images(browser, panel)) >= 2
        assert all(item.text.startswith("mask ") for item in legend(browser, panel))
    assert "masks" in browser.find_element(By.ID, "summary").text
    browser.save_screenshot(str(tmp_path / "demo.png"))
    assert (tmp_path / "demo.png").stat().st_size > 10_000

    links = {Path(urllib.parse.urlparse(a.get_attribute("href")).path).suffix: a.get_attribute("href")
             for a in browser.find_elements(By.CSS_SELECTOR, "#downloads a[href]")}
    assert links.keys() == {".png", ".npz", ".json"}
    with Image.open(io.BytesIO(download(links[".png"]))) as label_png:
        labels = np.asarray(label_png)
    arrays = np.load(io.BytesIO(download(links[".npz"])))
    assert labels.shape == (photo.height, photo.width) and np.array_equal(labels, arrays["labels"])
    assert labels.max() < arrays["lowres_masks"].shape[0] == len(legend(browser, "panel-emerdiff"))
    coco = json.loads(download(links[".json"]))
    assert [(i["file_name"], i["height"], i["width"]) for i in coco["images"]] == [("astronaut.png", *labels.shape)]
    assert sum(a["area"] for a in coco["annotations"]) == labels.size  # the masks tile the photo
    for annotation in coco["annotations"]:
        assert np.array_equal(coco_mask.decode(annotation["segmentation"]) > 0, labels == annotation["category_id"] - 1)

    item = legend(browser, "panel-emerdiff")[0]  # hovering a legend entry dims every other mask
    ActionChains(browser).move_to_element(item).perform()
    wait(browser, 10, lambda d: d.find_elements(By.CSS_SELECTOR, "#panel-emerdiff img.inactive"), "the highlight")
    item.click()  # clicking it says what it covers
    wait(browser, 30, lambda d: "of the photo" in d.find_element(By.ID, "selected").text, "the mask details")

    field = browser.find_element(By.CSS_SELECTOR, "#vocabulary textarea, #vocabulary input")
    field.send_keys(", ".join(VOCABULARY))
    browser.find_element(By.ID, "segment").click()
    wait(browser, RUN_S, lambda d: legend(d, "panel-emerdiff") and all(
        item.text in VOCABULARY for item in legend(d, "panel-emerdiff")), "a legend of class names")
    assert "| mask | class |" not in browser.find_element(By.ID, "summary").text  # rendered as a table
    assert browser.find_elements(By.CSS_SELECTOR, "#summary table")
    browser.save_screenshot(str(tmp_path / "named.png"))

    for clear in browser.find_elements(By.CSS_SELECTOR, "#upload button[aria-label=Clear]"):
        clear.click()  # the field holds the photo: empty it to upload another file
    wait(browser, 30, lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"), "an empty upload field")
    browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(tmp_path / "notes.png"))
    message = wait(browser, 60, lambda d: [t.text for t in d.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]")
                                           if "not an image" in t.text], "the message about the bad upload")
    assert "'notes.png' is not an image the demo can read" in message[0]
    assert "Traceback" not in browser.page_source
