"""The web page in headless Chromium against the real service (its CLI, a real ONNX model, an API key).

Every answer the page shows is checked against the /v1 API's answer for the very same bytes:
a real photograph chosen in the file input, one dropped, one pasted, and the PNG the canvas
produced from mouse strokes.
"""

from __future__ import annotations

import base64
import io
import re

import httpx
import numpy as np
import pytest
import skimage.data
from PIL import Image

pytestmark = pytest.mark.slow

API_KEY = "e2e-secret-key"
TIMING = re.compile(r"^server [\d.]+ ms \(queue [\d.]+, preprocess [\d.]+, inference [\d.]+\) · round trip [\d.]+ ms$")
ROWS_JS = """els => els.map(li => [li.querySelector('.label').textContent, li.querySelector('.prob').textContent,
                                   parseFloat(li.querySelector('.fill').style.width)])"""


def jpeg(name: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(buf, "JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def service(start_service, e2e_model):
    return start_service(e2e_model, VITSERVE_API_KEY=API_KEY)


@pytest.fixture(scope="module")
def page(browser, service):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.requests_seen = []
    page.problems = []
    page.on("request", lambda request: page.requests_seen.append(request.url))
    page.on("pageerror", lambda error: page.problems.append(f"page error: {error}"))
    # Chromium logs every 4xx answer as "Failed to load resource"; those are expected here.
    page.on(
        "console",
        lambda msg: (
            msg.type == "error"
            and "Failed to load resource" not in msg.text
            and page.problems.append(f"console: {msg.text}")
        ),
    )
    yield page
    context.close()


def v1_rows(service, data: bytes, content_type: str) -> list[list[str]]:
    """What the page should show for these bytes, computed through the API directly."""
    response = httpx.post(
        f"{service.url}/v1/classify?top_k=5",
        content=data,
        headers={"Content-Type": content_type, "Authorization": f"Bearer {API_KEY}"},
    )
    assert response.status_code == 200, response.text
    # label, the percentage printed, the bar's width in percent
    return [
        [p["label"], f"{100 * p['probability']:.1f}%", round(100 * p["probability"], 1)]
        for p in response.json()["predictions"]
    ]


def shown_rows(page) -> list[list[str]]:
    return page.eval_on_selector_all("#results li", ROWS_JS)


def wait_status(page, text: str) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#status")).to_have_text(text)


def drop_or_paste(page, event: str, data: bytes, filename: str) -> None:
    """Fire a real drop (on the drop zone) or paste (on the document) carrying a File."""
    transfer = page.evaluate_handle(
        """([b64, name]) => {
             const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
             const transfer = new DataTransfer();
             transfer.items.add(new File([bytes], name, {type: 'image/jpeg'}));
             return transfer;
           }""",
        [base64.b64encode(data).decode(), filename],
    )
    if event == "drop":
        page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
    else:
        page.evaluate(
            "t => document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: t, bubbles: true}))", transfer
        )


def test_page_end_to_end(page, service, tmp_path):
    from playwright.sync_api import expect

    architecture = httpx.get(f"{service.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()[
        "architecture"
    ]

    # Without the key the page loads (it is public) but the API answers 401: the page says so.
    page.goto(service.url + "/")
    expect(page.locator("#model-name")).to_have_text("unavailable")
    expect(page.locator("#status")).to_have_class(re.compile("error"))
    expect(page.locator("#status")).to_contain_text("Enter the server's API key above")

    page.fill("#api-key", API_KEY)
    page.click("#save-key")
    expect(page.locator("#model-name")).to_have_text(architecture)
    expect(page.locator("#model-details")).to_contain_text("10 classes")

    # A real photograph through the file input.
    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(jpeg("astronaut"))
    page.set_input_files("#file-input", str(photo))
    wait_status(page, "Top 5 for “astronaut.jpg”.")
    assert shown_rows(page) == v1_rows(service, photo.read_bytes(), "image/jpeg")
    assert TIMING.match(page.inner_text("#timing")), page.inner_text("#timing")
    assert page.is_visible("#preview")

    # Dropped and pasted photographs.
    coffee = jpeg("coffee")
    drop_or_paste(page, "drop", coffee, "coffee.jpg")
    wait_status(page, "Top 5 for “coffee.jpg”.")
    assert shown_rows(page) == v1_rows(service, coffee, "image/jpeg")
    chelsea = jpeg("chelsea")
    drop_or_paste(page, "paste", chelsea, "chelsea.jpg")
    wait_status(page, "Top 5 for “chelsea.jpg”.")
    assert shown_rows(page) == v1_rows(service, chelsea, "image/jpeg")

    # Draw a "7" with the mouse; the page sends the canvas as a PNG: dark strokes on white.
    page.click("#clear-drawing")
    box = page.locator("#canvas").bounding_box()
    stroke = [(0.25, 0.2), (0.75, 0.2), (0.45, 0.85)]
    page.mouse.move(box["x"] + stroke[0][0] * box["width"], box["y"] + stroke[0][1] * box["height"])
    page.mouse.down()
    for fx, fy in stroke[1:]:
        page.mouse.move(box["x"] + fx * box["width"], box["y"] + fy * box["height"], steps=12)
    page.mouse.up()
    with page.expect_request(lambda r: "/v1/classify" in r.url) as sent:
        page.click("#classify-drawing")
    assert sent.value.headers["content-type"] == "image/png"
    assert sent.value.headers["authorization"] == f"Bearer {API_KEY}"
    # Chromium does not expose Blob request bodies to the driver: read the canvas the page encoded.
    data_url = page.evaluate("document.getElementById('canvas').toDataURL('image/png')")
    png = base64.b64decode(data_url.split(",", 1)[1])
    drawing = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    assert drawing.shape == (280, 280)
    assert drawing[0, 0] == 255 and drawing[-1, -1] == 255  # white paper
    assert (drawing < 64).mean() > 0.03  # a thick dark pen, not a hairline
    assert drawing[56, 140] < 64 and drawing[140, 140] > 200  # on the top bar; the middle stays white
    wait_status(page, "Top 5 for the drawing.")
    assert shown_rows(page) == v1_rows(service, png, "image/png")

    # Clear really clears: nothing to classify until something is drawn again.
    page.click("#clear-drawing")
    page.click("#classify-drawing")
    wait_status(page, "Draw something on the canvas first.")

    # The server's error JSON is shown as is.
    broken = b"this is not a PNG at all"
    expected = httpx.post(
        f"{service.url}/v1/classify?top_k=5",
        content=broken,
        headers={"Content-Type": "image/png", "Authorization": f"Bearer {API_KEY}"},
    )
    assert expected.status_code == 422
    page.set_input_files("#file-input", files=[{"name": "broken.png", "mimeType": "image/png", "buffer": broken}])
    wait_status(page, expected.json()["error"]["message"])
    expect(page.locator("#status")).to_have_class(re.compile("error"))
    assert shown_rows(page) == []

    # The key lives in sessionStorage: a reload keeps it.
    page.reload()
    expect(page.locator("#model-name")).to_have_text(architecture)
    assert page.input_value("#api-key") == API_KEY

    # Nothing left the server's origin; no script errors or CSP violations.
    off_origin = [u for u in page.requests_seen if not u.startswith((service.url + "/", "blob:", "data:"))]
    assert off_origin == []
    assert page.problems == []
