"""The Snakemake HTML report of a finished run, opened in a real headless browser (Debian's chromium).

The report is a React app: its results only appear in the DOM once its scripts have run and a category is
opened. The test drives the page through the Chrome DevTools protocol over ``--remote-debugging-pipe`` (no
extra Python package): it opens every category and subcategory from the menu, opens every result's
information panel (where Snakemake shows the caption) and its view button, and collects what the rendered page
shows. It then checks that every table and figure of the paper, every site preview and every training curve
is listed, with its caption, that the figures decode as images and that each table is rendered as a table.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from fedpsmos.paper.table_format import display_table
from tests.workflow_helpers import REPO, copy_run, snakemake

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1600,1000",
]
CAPTIONS = REPO / "workflow" / "report"
SITES = ["site1", "site2", "site5"]
# The paper's figures: label in the report -> file stem, and how its caption begins.
FIGURES = {
    "Dice per organ and model": ("fig_dice_per_organ", "Dice per test case for each organ (panels)"),
    "Qualitative results": ("fig_qualitative", "Qualitative results (as the paper's Figure 2)"),
    "Federated training curves": ("fig_federated_curves", "Federated training per round, one column"),
    "Training curves": ("fig_training_curves", "Training curves grouped by model family"),
}

pytestmark = pytest.mark.skipif(
    not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)),
    reason="Debian's chromium is not installed (CI installs it with .ci/install_chromium.sh)",
)


class DevTools:
    """A minimal Chrome DevTools protocol client over ``--remote-debugging-pipe`` (fd 3 in, fd 4 out)."""

    def __init__(self, user_data_dir: Path) -> None:
        cmd_read, self._cmd_write = os.pipe()
        self._resp_read, resp_write = os.pipe()

        def child_fds() -> None:
            # The browser reads commands on fd 3 and writes replies on fd 4; dup first so that a pipe end
            # that already is 3 or 4 is not overwritten before it is copied.
            a, b = os.dup(cmd_read), os.dup(resp_write)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", "--remote-debugging-pipe"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=child_fds,
            close_fds=False,
        )
        os.close(cmd_read)
        os.close(resp_write)
        self._buffer = b""
        self._next_id = 0
        self.session: str | None = None

    def send(self, method: str, params: dict[str, Any] | None = None, *, browser: bool = False) -> dict:
        """Send one command (to the attached page unless ``browser``) and return its result."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if self.session and not browser:
            message["sessionId"] = self.session
        os.write(self._cmd_write, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _read(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._resp_read, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium closed the DevTools pipe (exit code {self.proc.poll()})")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def open_page(self, url: str) -> None:
        """Open ``url`` in a new tab and attach to it."""
        target = self.send("Target.createTarget", {"url": "about:blank"}, browser=True)["targetId"]
        self.session = self.send(
            "Target.attachToTarget", {"targetId": target, "flatten": True}, browser=True
        )["sessionId"]
        self.send("Page.enable")
        self.send("Page.navigate", {"url": url})

    def evaluate(self, expression: str) -> Any:
        """Evaluate JavaScript in the page (awaiting a returned promise) and return its JSON value."""
        result = self.send(
            "Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True}
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> None:
        """Write a PNG screenshot of the page."""
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"]))

    def close(self) -> None:
        """Close the browser and the pipes."""
        try:
            self.send("Browser.close", browser=True)
        except (OSError, RuntimeError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_write)
        os.close(self._resp_read)


# Clicks through the report like a reader: menu -> category -> (subcategory) -> a result's information
# panel -> its view button, and reports what the rendered page shows at each step.
EXPLORE_JS = r"""
(async () => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const text = (el) => (el ? el.innerText.replace(/\s+/g, " ").trim() : "");
  const navbar = () => document.querySelector("#app nav");
  const content = () => navbar().parentElement.lastElementChild;
  async function until(what, pred) {
    for (let i = 0; i < 400; i++) {
      const value = pred();
      if (value) return value;
      await sleep(25);
    }
    throw new Error("timed out waiting for " + what);
  }
  // Navbar links that are neither breadcrumbs nor result rows: the menu, category and subcategory items.
  const menuLinks = () => [...navbar().querySelectorAll(":scope > div > div > ul > li > a")];
  const menuLink = (label) => menuLinks().find((a) => text(a) === label);
  const resultRows = () => [...navbar().querySelectorAll("table tbody tr")];
  const heading = (name) => [...navbar().querySelectorAll("li")].find((li) => li.textContent === name);
  async function home() {
    navbar().querySelector("nav ol li a").click();
    await until("the menu", () => menuLink("Workflow"));
  }
  async function openList(category, subcategory) {
    await home();
    menuLink(category).click();
    await until("leaving the menu", () => !menuLink("Workflow"));
    if (subcategory !== null) {
      (await until("subcategory " + subcategory, () => menuLink(subcategory))).click();
    }
    return await until("the results of " + category, () => resultRows().length > 0 && resultRows());
  }

  await until("the report app", () => navbar() && menuLink("Workflow"));
  const landing = text(document.body);
  const categories = menuLinks().map(text).filter((t) => !["Workflow", "Statistics", "About"].includes(t));
  const found = [];
  for (const category of categories) {
    await home();
    menuLink(category).click();
    await until("leaving the menu", () => !menuLink("Workflow"));
    await until("category " + category, () => resultRows().length > 0 || menuLinks().length > 0);
    const subcategories = resultRows().length > 0 ? [null] : menuLinks().map(text);
    for (const subcategory of subcategories) {
      const n = (await openList(category, subcategory)).length;
      for (let i = 0; i < n; i++) {
        const row = (await openList(category, subcategory))[i];
        const cells = [...row.querySelectorAll("td")];
        const label = cells.slice(0, -1).map(text).join(" | ");
        const buttons = row.querySelectorAll("td:last-child a");
        buttons[buttons.length - 1].click();  // the information button
        const caption = (await until("the description of " + label, () => heading("Description")))
          .nextElementSibling;
        const literal = [...caption.querySelectorAll("pre")].map((pre) => pre.innerText);
        // The breadcrumbs end with the result's path (then the search box).
        const crumbs = [...navbar().querySelectorAll("nav ol li")].map(text);
        const path = crumbs.filter((t) => t.includes("/")).pop();
        const view = navbar().querySelector("ul a[type=button]");  // the view button beside the path
        const entry = { category, subcategory, label, path, caption: text(caption), literal,
                        download: view.getAttribute("download"), image: null };
        if (!entry.download) {
          view.click();
          const img = await until("the image of " + label, () => {
            const el = content().querySelector("img");
            return el && el.complete && el.naturalWidth > 0 && el.src === results[path].data_uri && el;
          });
          entry.image = [img.naturalWidth, img.naturalHeight];
        }
        found.push(entry);
      }
    }
  }
  return { landing, categories, found };
})()
"""


def explore_report(report: Path, screenshots: Path) -> dict[str, Any]:
    """Open ``report`` in headless chromium, click through every result; screenshots go to ``screenshots``."""
    browser = DevTools(screenshots / "profile")
    try:
        browser.open_page(report.resolve().as_uri())
        seen = browser.evaluate(EXPLORE_JS)
        browser.screenshot(screenshots / "report_last_result.png")
        # The landing page as a reader first sees it.
        browser.evaluate("document.querySelector('#app nav nav ol li a').click()")
        browser.screenshot(screenshots / "report_landing.png")
        return seen
    finally:
        browser.close()


def first_sentence(caption_file: Path) -> str:
    """The first sentence of a caption file that starts with plain text (up to the first '. ')."""
    return re.sub(r"\s+", " ", caption_file.read_text()).strip().split(". ")[0]


@pytest.mark.workflow
def test_report_shows_every_table_and_figure_with_its_caption(tiny_run: Path, tmp_path: Path) -> None:
    # Prepare: the report of the tiny run (run once per session by the tiny_run fixture)
    report = tmp_path / "report.html"
    snakemake(copy_run(tiny_run, tmp_path / "run"), "--report", str(report))  # the shared run stays as it is
    # Execute: open it in the browser and click through every category and result
    seen = explore_report(report, tmp_path)
    # Assert: the landing page names the workflow and links every category of results
    assert "Federated partially supervised multi-organ segmentation" in seen["landing"]
    assert set(seen["categories"]) == {"Tables", "Figures", "Data", "Training curves"}
    entries = seen["found"]
    by_category: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        by_category.setdefault(entry["category"], []).append(entry)

    # Tables 2-6, each downloadable as CSV, Markdown and LaTeX; each description shows the caption and the
    # table itself (the Markdown pipe table: the CSV's columns as header, one line per CSV row).
    tables = {(e["label"], e["download"]): e for e in by_category["Tables"]}
    assert len(tables) == 15
    for n in (2, 3, 4, 5, 6):
        csv = pd.read_csv(tiny_run / "results" / "paper" / f"table{n}.csv", keep_default_na=False)
        for ext in ("csv", "md", "tex"):
            entry = tables[(f"Table {n} | {ext.upper()}", f"table{n}.{ext}")]
            assert first_sentence(CAPTIONS / f"table{n}.rst") in entry["caption"]
            assert len(entry["literal"]) == 1, (n, ext)
            # The first pipe table is the results table as displayed (mean ± sd cells, no p-value columns).
            lines = entry["literal"][0].splitlines()
            start = next(i for i, line in enumerate(lines) if line.startswith("| "))
            rows = [line for line in lines[start:] if line.startswith("| ")][: len(csv) + 1]
            shown = list(display_table(pd.read_csv(tiny_run / "results" / "paper" / f"table{n}.csv")).columns)
            assert rows[0] == "| " + " | ".join(shown) + " |", (n, ext)
            model = shown.index("model")
            assert [row[2:-2].split(" | ")[model] for row in rows[1:]] == list(csv["model"]), (n, ext)

    # The paper's figures, each decoded as an image at the PNG's size, with its caption.
    figures = {e["label"]: e for e in by_category["Figures"]}
    assert set(figures) == set(FIGURES)
    for label, (stem, caption) in FIGURES.items():
        assert figures[label]["path"] == f"results/paper/{stem}.png"
        assert figures[label]["caption"].startswith(caption)
        assert figures[label]["image"] == list(_png_size(tiny_run / figures[label]["path"]))

    # One preview per site, in the site's subcategory, its caption naming the site.
    previews = {e["subcategory"]: e for e in by_category["Data"]}
    assert set(previews) == set(SITES)
    for site, entry in previews.items():
        assert entry["path"] == f"results/data/{site}/preview.png"
        assert entry["caption"].startswith(f"Site {site} at a glance")
        assert entry["image"] == list(_png_size(tiny_run / entry["path"]))

    # Every training curve of the run (pretraining, central, site-alone, adapted, federated settings).
    curves = {e["path"]: e for e in by_category["Training curves"]}
    expected = {
        p.relative_to(tiny_run).as_posix()
        for pattern in ("results/models/**/curve.png", "results/models/federated/*/rounds.png")
        for p in tiny_run.glob(pattern)
    }
    assert len(expected) >= 1 + 1 + len(SITES) + 3 * len(SITES) + 3
    assert set(curves) == expected
    for path, entry in curves.items():
        assert entry["image"] == list(_png_size(tiny_run / path))
        if path.endswith("rounds.png"):
            setting = Path(path).parent.name
            assert entry["caption"].startswith(f"Federated setting {setting} (")
        else:
            assert "training loss (left axis) and learning rate (right axis, log scale)" in entry["caption"]
    assert curves["results/models/adapted/decoder/site5/curve.png"]["caption"].startswith(
        "The federated model adapted to site5 in mode decoder (decoder trained, encoder frozen)"
    )
    # Nothing in the report failed to render (docutils prints its errors into the page).
    for entry in entries:
        assert "System Message" not in entry["caption"], entry["path"]
    assert "System Message" not in seen["landing"]


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", path
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
