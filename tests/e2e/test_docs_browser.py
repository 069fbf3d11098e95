"""/docs in headless Chromium with nothing but the server reachable: Swagger UI draws, Authorize takes the key.

Every request the browser makes outside 127.0.0.1 is aborted (an offline host), and the page's
strict Content-Security-Policy is in force: any violation or page error fails the test.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

API_KEY = "docs-secret-key"


@pytest.fixture(scope="module")
def service(start_service, e2e_model):
    return start_service(e2e_model, VITSERVE_API_KEY=API_KEY)


def test_swagger_ui_works_offline_and_calls_the_api_with_the_key(browser, service):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(30_000)
    outside, problems = [], []
    local = service.url + "/"

    def only_local(route) -> None:
        if route.request.url.startswith(local):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on(
        "console",
        lambda msg: msg.type == "error" and "Failed to load resource" not in msg.text and problems.append(msg.text),
    )
    try:
        page.goto(f"{service.url}/docs")
        page.wait_for_selector(".opblock-summary-path", timeout=30_000)
        paths = page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.textContent.trim())")
        assert "/v1/classify" in paths and "/v2/models/{model_name}/infer" in paths

        # The Authorize button (the document's bearer scheme) takes the key ...
        page.click("button.authorize")
        page.fill(".auth-container input[type=text], .auth-container input[type=password]", API_KEY)
        page.click(".auth-btn-wrapper button.authorize")
        page.click("button.btn-done")

        # ... and "Try it out" on GET /v1/models sends it: 200 and the model's description.
        block = page.locator(".opblock-get", has=page.locator('.opblock-summary-path[data-path="/v1/models"]')).first
        block.locator(".opblock-summary").click()
        block.locator("button.try-out__btn").click()
        with page.expect_response(lambda r: r.url == f"{service.url}/v1/models") as answer:
            block.locator("button.execute").click()
        assert answer.value.status == 200
        assert answer.value.request.headers["authorization"] == f"Bearer {API_KEY}"
        assert outside == [] and problems == [], (outside, problems)
    finally:
        context.close()
