"""The rendered docs, loaded in a real browser: every page loads cleanly, shows its figures and tables, and its links
resolve."""
import functools, http.server, json, os, shutil, threading
from pathlib import Path
from urllib.parse import urljoin, urlparse

import pytest

from mura_study import study
from mura_study.core import project_root

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRED = os.environ.get("MURA_STUDY_DOCS_TEST") == "required"  # set by .ci/run, which installs both programs
ROOT = project_root()
RESULTS = ROOT / "results" / "demo"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _missing():
    need = {"quarto": shutil.which("quarto"), "chromium": BROWSER}
    try: import playwright  # noqa: F401
    except ImportError: need["playwright (pip install -e '.[dev]')"] = None
    return [k for k, v in need.items() if not v]


@pytest.fixture(scope="module")
def site():
    if missing := _missing():
        if REQUIRED: pytest.fail(f"the docs test must run here, but {', '.join(missing)} is missing")
        pytest.skip(f"needs {', '.join(missing)}")
    pages = study.build_docs(RESULTS)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(ROOT / "_docs"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield pages, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=BROWSER, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _shown_images(nb: Path) -> int:
    "Image outputs of the cells a reader sees (nbdev hides `#| hide` cells)."
    cells = json.loads(nb.read_text())["cells"]
    shown = [c for c in cells if c["cell_type"] == "code" and "#| hide" not in "".join(c["source"])]
    return sum(any(k.startswith("image/") for k in o.get("data", {})) for c in shown for o in c["outputs"])


def _visit(browser, url):
    page, errors = browser.new_page(viewport={"width": 1280, "height": 900}), []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    assert page.goto(url, wait_until="networkidle").status == 200, url
    page.evaluate("document.querySelectorAll('img').forEach(i => i.loading = 'eager')")
    page.wait_for_function("[...document.images].every(i => i.complete)")
    return page, errors


def test_every_page_loads_without_console_errors_and_shows_its_figures(site, browser, tmp_path):
    pages, base = site
    chapters = {nb.stem.split("_", 1)[1]: nb for nb in (RESULTS / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    assert {p.stem for p in pages} >= {"index", *chapters}, [p.stem for p in pages]
    for name, nb in chapters.items():
        page, errors = _visit(browser, base + f"{name}.html")
        loaded = page.evaluate("[...document.images].filter(i => i.naturalWidth > 0).length")
        assert not errors, (name, errors)
        assert loaded >= _shown_images(nb), (name, loaded, _shown_images(nb))
        if name == "learner": page.screenshot(path=tmp_path / "learner.png", full_page=False)
        page.close()


def test_index_shows_the_results_tables_and_figures(site, browser, tmp_path):
    _, base = site
    page, errors = _visit(browser, base + "index.html")
    page.screenshot(path=tmp_path / "index.png", full_page=True)
    assert not errors, errors
    assert page.locator("table").count() >= 5
    assert page.evaluate("[...document.images].filter(i => i.naturalWidth > 0).length") >= 2
    assert "Results of the latest demo run" in page.inner_text("body")


def test_internal_links_resolve(site, browser):
    pages, base = site
    page = browser.new_page()
    for p in pages:
        page.goto(base + p.name)
        hrefs = page.eval_on_selector_all("a[href]", "as => as.map(a => a.getAttribute('href'))")
        for h in hrefs:
            url = urljoin(base + p.name, h)
            if urlparse(url).netloc != urlparse(base).netloc or h.startswith("#"): continue
            assert page.request.get(url.split("#")[0]).status == 200, (p.name, h)
