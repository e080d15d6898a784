"""tools/demo.py in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by Selenium.

The demo runs as users start it (`python tools/demo.py --cfg configs/tiny.yaml --port N`) on a free port of
127.0.0.1; the test uploads a real photo, segments it, checks the four panels and the downloads, highlights
a mask, names the masks with a vocabulary, uploads a file that is not an image, and stops the server.
Where the page draws things is measured too: the four panels' pictures (a wide and a tall photo) have one
size and place, every mask layer lies on its photo, the rendered class overlay agrees with the downloaded
label map, and a message about an upload is shown once.
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
from scipy import ndimage
from skimage import data

from conftest import REPO, TINY
from emerdiff.predict.names import MaskNames

pytest.importorskip("gradio", reason="the demo needs the demo extra: pip install -e '.[demo]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra: pip install -e '.[dev]'")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
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
WINDOW = (1200, 2000)  # the browser's window (width, height)


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
    # 1200 px wide: a legend of six masks wraps onto two lines, one of a few class names does not (that
    # difference moved the class overlay down); 2000 px high: the panels of a tall photo fit in a screenshot.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--force-device-scale-factor=1",
                     "--window-size={},{}".format(*WINDOW)):
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


PANELS = ("panel-photo", "panel-kmeans", "panel-bilinear", "panel-emerdiff")

# Where each loaded <img> of a panel draws its picture, in viewport pixels: the element's box with object-fit and
# object-position applied (a layer drawn `contain` in a box taller than the photo's sits lower than the photo).
DRAWN_BOXES = """
return [...document.querySelectorAll('#' + arguments[0] + ' img')].filter(i => i.complete && i.naturalWidth > 0)
  .map(i => {
    const r = i.getBoundingClientRect(), style = getComputedStyle(i);
    const nw = i.naturalWidth, nh = i.naturalHeight;
    let w = r.width, h = r.height;
    if (style.objectFit === 'contain' || style.objectFit === 'scale-down') {
      const scale = Math.min(w / nw, h / nh, style.objectFit === 'contain' ? Infinity : 1);
      w = nw * scale; h = nh * scale;
    } else if (style.objectFit === 'none') { w = nw; h = nh; }
    const [px, py] = style.objectPosition.split(' ').map(v => parseFloat(v) / 100);
    return {layer: i.classList.contains('mask'), x: r.x + (r.width - w) * px, y: r.y + (r.height - h) * py, w, h};
  });
"""

# Which of the points (x, y lists, viewport pixels) show a picture of panel arguments[0] (not its label or buttons).
PICTURE_SHOWN = """
const panel = document.getElementById(arguments[0]);
return arguments[2].map(y => arguments[1].map(x => {
  const top = document.elementFromPoint(x, y);
  return top !== null && top.tagName === 'IMG' && panel.contains(top);
}));
"""

# Every toast message the page shows from now on (the elements, read at the end: a grouped toast lists each message).
WATCH_TOASTS = """
window.toastTexts = new Set();
new MutationObserver(records => records.forEach(r => r.addedNodes.forEach(n => {
  if (n.nodeType !== 1) return;
  (n.matches('[data-testid=toast-text]') ? [n] : n.querySelectorAll('[data-testid=toast-text]'))
    .forEach(t => window.toastTexts.add(t));
}))).observe(document.body, {childList: true, subtree: true});
"""


def box(drawn: dict) -> tuple:
    return drawn["x"], drawn["y"], drawn["w"], drawn["h"]


def open_page(driver, url: str) -> None:
    """A fresh page, watched for toast messages."""
    driver.get(url)
    wait(driver, 60, lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"), "the upload field")
    driver.execute_script(WATCH_TOASTS)


def shown_messages(driver) -> list:
    return driver.execute_script("return Array.from(window.toastTexts, t => t.textContent.trim())")


def upload(driver, path: Path) -> None:
    """Put `path` into the upload field (emptied first) and wait for its preview."""
    for clear in driver.find_elements(By.CSS_SELECTOR, "#upload button[aria-label=Clear]"):
        clear.click()
    wait(driver, 30, lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"), "an empty upload field")
    driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(path))


def segment(driver, vocabulary: str = "") -> dict:
    """Press Segment with `vocabulary`; wait for four new panels and new downloads; the download links by suffix."""
    field = driver.find_element(By.CSS_SELECTOR, "#vocabulary textarea, #vocabulary input")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(vocabulary)
    sources = {img.get_attribute("src") for img in driver.find_elements(By.CSS_SELECTOR, "img")}
    sources |= {a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "#downloads a[href]")}
    driver.find_element(By.ID, "segment").click()

    def done(d) -> bool:  # (the photo panel may show the same file again)
        layers = [img for p in PANELS[1:] for img in d.find_elements(By.CSS_SELECTOR, f"#{p} img")]
        links = [a.get_attribute("href") for a in d.find_elements(By.CSS_SELECTOR, "#downloads a[href]")]
        return (links and not sources & set(links) and not sources & {img.get_attribute("src") for img in layers}
                and all(len(loaded_images(d, p)) == len(d.find_elements(By.CSS_SELECTOR, f"#{p} img")) > 0
                        for p in PANELS))

    wait(driver, RUN_S, done, "four new panels and new downloads")
    time.sleep(0.5)  # the layers fade in (a 0.2 s transition)
    return {Path(urllib.parse.urlparse(href).path).suffix: href
            for href in (a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "#downloads a[href]"))}


def drawn_photo(driver, panel: str) -> tuple:
    """Where `panel` draws its photo (x, y, width, height); every mask layer of the panel must lie exactly on it."""
    drawn = driver.execute_script(DRAWN_BOXES, panel)
    photos = [box(d) for d in drawn if not d["layer"]]
    assert len(photos) == 1, panel
    for layer in (d for d in drawn if d["layer"]):
        assert box(layer) == pytest.approx(photos[0], abs=1), panel
    return photos[0]


@pytest.mark.parametrize("size, window", [((200, 120), 1200), ((100, 200), 1800)], ids=["wide", "tall"])
def test_the_four_panels_draw_the_photo_and_every_layer_at_one_size_and_place(server, browser, tmp_path, size, window):
    """The tall photo in a wide window: its panels (about 400 px wide) are wider than the picture sent (256 px)."""
    Image.fromarray(data.astronaut()).resize(size).save(tmp_path / "photo.png")
    browser.set_window_size(window, WINDOW[1])
    try:
        open_page(browser, server)
        upload(browser, tmp_path / "photo.png")
        segment(browser)
        pictures = [drawn_photo(browser, panel) for panel in PANELS]
    finally:
        browser.set_window_size(*WINDOW)
    for panel, picture in zip(PANELS[1:], pictures[1:]):  # side by side: one size, one top, left to right
        assert picture[1:] == pytest.approx(pictures[0][1:], abs=1), (panel, picture, pictures[0])
    assert [p[0] for p in pictures] == sorted(p[0] for p in pictures)
    assert pictures[0][2] / pictures[0][3] == pytest.approx(size[0] / size[1], rel=0.02)  # the photo's aspect ratio


def test_the_class_overlay_lies_where_the_label_map_has_the_class(server, browser, tmp_path):
    grey = np.asarray(Image.fromarray(data.astronaut()).convert("L").resize((160, 160)))
    Image.fromarray(np.dstack([grey] * 3)).save(tmp_path / "grey.png")  # an RGB photo without colour
    open_page(browser, server)
    upload(browser, tmp_path / "grey.png")
    links = segment(browser, ", ".join(VOCABULARY))
    arrays = np.load(io.BytesIO(download(links[".npz"])))
    labels, names = arrays["labels"], MaskNames.from_arrays(arrays)
    classes = {}
    for k in range(len(names.mask_classes)):
        classes.setdefault(names.name(k) or "(no class)", []).append(k)
    browser.execute_script("window.scrollTo(0, 0)")
    x, y, w, h = drawn_photo(browser, "panel-emerdiff")
    margin = int(np.ceil(3 * labels.shape[0] / h)) + 1  # label pixels within 3 screen pixels of a class boundary
    rows = np.arange(int(np.ceil(y)) + 1, int(y + h) - 1, 2)
    cols = np.arange(int(np.ceil(x)) + 1, int(x + w) - 1, 2)
    at = (np.floor((rows[:, None] + 0.5 - y) / h * labels.shape[0]).astype(int),
          np.floor((cols[None, :] + 0.5 - x) / w * labels.shape[1]).astype(int))
    entries = legend(browser, "panel-emerdiff")
    assert {item.text for item in entries} == classes.keys()
    for item in entries:  # hovering a legend entry shows its layer alone
        ActionChains(browser).move_to_element(item).perform()
        wait(browser, 10, lambda d: d.find_elements(By.CSS_SELECTOR, "#panel-emerdiff img.mask.active"), "the highlight")
        time.sleep(0.5)
        with Image.open(io.BytesIO(browser.get_screenshot_as_png())) as shot:
            screen = np.asarray(shot.convert("RGB")).astype(int)
        coloured = np.ptp(screen[rows[:, None], cols[None, :]], axis=-1) > 20  # the grey photo under a colour
        has_class = np.isin(labels, classes[item.text]).astype(np.uint8)
        inside = ndimage.minimum_filter(has_class, 2 * margin + 1)[at] == 1
        outside = ndimage.maximum_filter(has_class, 2 * margin + 1)[at] == 0
        shown = np.array(browser.execute_script(PICTURE_SHOWN, "panel-emerdiff", cols.tolist(), rows.tolist()))
        inside, outside = inside & shown, outside & shown
        assert (inside | outside).sum() > 1000
        agree = np.concatenate([coloured[inside], ~coloured[outside]]).mean()
        assert agree > 0.98, f"{item.text}: the overlay agrees with the label map at {agree:.1%} of the points"


def test_each_message_about_an_upload_is_shown_once(server, browser, tmp_path):
    Image.fromarray(data.camera()).resize((128, 128)).save(tmp_path / "camera.png")  # grayscale: a note
    (tmp_path / "notes.png").write_text("not a picture")
    open_page(browser, server)
    upload(browser, tmp_path / "camera.png")
    segment(browser)
    assert "note: grayscale photo" in browser.find_element(By.ID, "summary").text
    upload(browser, tmp_path / "notes.png")
    wait(browser, 60, lambda d: any("not an image" in m for m in shown_messages(d)), "the message about the bad upload")
    time.sleep(3)  # time for a second copy to arrive
    shown = shown_messages(browser)
    assert sum("grayscale photo" in m for m in shown) == 1, shown
    assert sum("not an image" in m for m in shown) == 1, shown
