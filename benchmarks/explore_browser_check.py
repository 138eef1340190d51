"""The rate explorer in a real browser: JupyterLab from a clone, headless Chromium, one slider move, a screenshot.

A manual check, not a test (it needs Chromium and Playwright, which the project does not
depend on). It serves JupyterLab from ``--clone`` on 127.0.0.1 only (a random token, a
free port), opens ``notebooks/06_explore.ipynb``, runs all cells, checks that the widgets
rendered, drags the lambda slider once, waits for the preview and then the full image,
checks that the pictures and the status changed, saves a screenshot, and stops the server::

    apt-get install -y chromium                      # Debian's package
    python3 -m venv /tmp/pw && /tmp/pw/bin/pip install playwright
    git clone /work/main /tmp/explore-clone
    ln -s /work/shared /tmp/shared                   # ../shared beside the clone, as on a dev machine
    /tmp/pw/bin/python benchmarks/explore_browser_check.py --clone /tmp/explore-clone \\
        --jupyter-python /work/main/.venv/bin/python --out docs/explore.png

Playwright drives the system Chromium (``--chromium``); its own browser download is not
used. The kernel imports the clone's ``alice_lib`` (``PYTHONPATH``); files the notebook
writes go to a temporary ``ALICE_OUTPUT_ROOT``. Prints what it saw, as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

NOTEBOOK = "notebooks/06_explore.ipynb"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(clone: Path, python: str, port: int, token: str, output_root: str, log) -> subprocess.Popen:
    """JupyterLab on 127.0.0.1 serving ``clone``, its kernels importing the clone's package."""
    env = {**os.environ, "PYTHONPATH": str(clone), "ALICE_OUTPUT_ROOT": output_root}
    cmd = [python, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={clone}", "--ServerApp.port_retries=0"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # a container's root: JupyterLab refuses without this
        cmd.append("--allow-root")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=clone)


def wait_for_lab(base: str, token: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError("JupyterLab did not answer")


def run_all(page) -> None:
    """Accept the kernel JupyterLab proposes (when it asks), wait until it is idle, then Run > Run All Cells."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
    try:
        page.locator(".jp-Dialog .jp-mod-accept").click(timeout=15_000)  # "Select Kernel": Python 3 (ipykernel)
    except PlaywrightTimeout:
        pass
    page.wait_for_function("() => document.querySelector('.jp-StatusBar-Widget') !== null && "
                           "document.body.innerText.includes('(ipykernel) | Idle')", timeout=120_000)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


def panel_state(page) -> dict:
    """What the explorer panel shows now: the slider readout, the status line, the pictures' sources."""
    return page.evaluate("""() => {
        const panel = [...document.querySelectorAll('.widget-vbox')].find(v => v.querySelector('.noUi-handle'));
        if (!panel) return null;
        const imgs = [...panel.querySelectorAll('img')];
        const status = [...panel.querySelectorAll('.widget-html-content')].map(e => e.innerText)
            .find(t => t.includes('full image') || t.includes('preview at'));
        return {readout: panel.querySelector('.widget-readout').innerText, status: status || '',
                images: imgs.map(i => i.src), loaded: imgs.map(i => i.complete && i.naturalWidth > 0)};
    }""")


def move_slider(page, fraction: float) -> None:
    """Drag the lambda slider's handle by ``fraction`` of its track, as a hand would (the panel's first slider)."""
    handle = page.locator(".widget-vbox .noUi-handle").first
    handle.scroll_into_view_if_needed()
    track = page.locator(".widget-vbox .noUi-target").first.bounding_box()
    box = handle.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + fraction * track["width"], y, steps=12)
    page.mouse.up()


def _status_lmbda(state: dict) -> float:
    """The lambda the status line says was coded."""
    found = re.search(r"lambda (\d+\.\d+)", state["status"])
    return float(found.group(1)) if found else math.nan


def wait_for(page, predicate, timeout: float) -> tuple[dict, float]:
    """Poll :func:`panel_state` until ``predicate`` holds; (state, seconds waited)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        state = panel_state(page)
        if state and predicate(state):
            return state, time.perf_counter() - start
        time.sleep(0.05)
    raise TimeoutError(f"the panel did not reach the expected state: {panel_state(page)}")


def check(page, out: Path, fraction: float) -> dict:
    """Run the notebook, move the slider once, screenshot; what was seen."""
    run_all(page)
    before, _ = wait_for(page, lambda s: "full image" in s["status"] and len(s["images"]) == 7
                         and all(s["loaded"]), 300)
    move_slider(page, fraction)
    released = time.perf_counter()
    seen_preview = None
    after = None
    while time.perf_counter() - released < 120:
        state = panel_state(page)
        if seen_preview is None and "preview at" in state["status"]:
            seen_preview = time.perf_counter() - released
        if ("full image" in state["status"] and state["readout"] != before["readout"]
                and abs(_status_lmbda(state) - float(state["readout"])) <= 1e-4 and all(state["loaded"])):
            after = state
            break
        time.sleep(0.05)
    if after is None:
        raise TimeoutError(f"no full image after the move: {panel_state(page)}")
    full_seconds = time.perf_counter() - released
    page.locator(".widget-vbox button", has_text="write .alice").first.click()
    page.wait_for_function("() => document.body.innerText.includes('wrote ')", timeout=60_000)
    wrote = page.evaluate("() => [...document.querySelectorAll('.widget-html-content')].map(e => e.innerText)"
                          ".find(t => t.startsWith('wrote '))")
    tidy(page)
    page.evaluate("() => document.querySelector('.widget-vbox .noUi-handle')"
                  ".closest('.jp-OutputArea').scrollIntoView({block: 'start'})")
    time.sleep(0.5)
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out))
    changed = [a != b for a, b in zip(before["images"], after["images"])]
    return {"readout_before": before["readout"], "readout_after": after["readout"],
            "status_before": before["status"], "status_after": after["status"],
            "pictures_changed": changed, "preview_seen_after_s": seen_preview,
            "full_image_after_s": round(full_seconds, 2), "write_button": wrote, "screenshot": str(out),
            "screenshot_bytes": out.stat().st_size}


def tidy(page) -> None:
    """No news prompt over the panel in the screenshot."""
    for button in page.locator(".jp-toast-button", has_text="No").all():
        button.click()
    time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clone", required=True, type=Path, help="a fresh clone of the repository")
    parser.add_argument("--jupyter-python", default=sys.executable, help="the Python whose JupyterLab serves it")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--out", default="docs/explore.png", type=Path)
    parser.add_argument("--fraction", type=float, default=-0.15,
                        help="how far the slider handle is dragged, as a fraction of its track (left: lower rate)")
    parser.add_argument("--size", default="1440x1320", help="browser window, WxH")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    clone = args.clone.resolve()
    port, token = _free_port(), secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}"
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="explore-check-") as root, open(Path(root) / "lab.log", "w") as log:
        server = start_lab(clone, args.jupyter_python, port, token, root, log)
        try:
            wait_for_lab(base, token, server)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": width, "height": height})
                errors = []
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}")
                seen = check(page, args.out.resolve(), args.fraction)
                browser.close()
            seen["console_errors"] = errors
            seen["written"] = sorted(str(p.relative_to(root)) for p in Path(root).rglob("*.alice"))
        except Exception:
            log.flush()
            print((Path(root) / "lab.log").read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(json.dumps(seen, indent=2))
    ok = all(seen["pictures_changed"][i] for i in (1, 2, 6)) and seen["readout_after"] != seen["readout_before"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
