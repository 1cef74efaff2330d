"""Each released lab opens in JupyterLab, in a real (headless) Chromium, with the course kernel and
no error. `make test` installs Debian's chromium; screenshots are kept under build/browser/."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import RELEASED_NOTEBOOKS
from labhelpers.paths import REPO_ROOT, build_dir

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LABS = RELEASED_NOTEBOOKS
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory):
    assert Path(CHROMIUM).exists(), "Chromium is missing: `make test` installs it (Debian package chromium)"
    port, token = _free_port(), "sftlabs-test"
    # started as the README says, `make jupyter` (JupyterLab on labs/), with a fixed port and token
    args = (f"--no-browser --ip=127.0.0.1 --port={port} --IdentityProvider.token={token} --allow-root "
            "--ServerApp.open_browser=False --LabApp.news_url= "
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate")
    server = subprocess.Popen(["make", "--no-print-directory", "jupyter", f"VENV={sys.prefix}", f"JUPYTER_ARGS={args}"],
                              cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=1)
            break
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"JupyterLab did not start:\n{server.stderr.read()[-3000:]}")
            time.sleep(0.5)
    else:
        os.killpg(server.pid, signal.SIGKILL)
        raise RuntimeError("JupyterLab did not answer within 60 s")
    yield url, token
    os.killpg(server.pid, signal.SIGTERM)  # make and the server it started
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)


def _wait_for_idle_kernel(url: str, token: str, path: str, timeout_s: float = 90) -> dict:
    import json

    deadline = time.monotonic() + timeout_s
    sessions: list = []
    while time.monotonic() < deadline:
        sessions = json.load(urllib.request.urlopen(f"{url}/api/sessions?token={token}", timeout=5))
        mine = [s for s in sessions if s.get("path") == path]
        if mine and mine[0]["kernel"]["execution_state"] == "idle":
            return mine[0]
        time.sleep(0.5)
    raise AssertionError(f"no idle kernel for {path} after {timeout_s} s; sessions: {sessions}")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.mark.slow
@pytest.mark.parametrize("notebook", LABS, ids=lambda p: p.stem)
def test_lab_renders_in_jupyterlab(notebook, jupyterlab, browser):
    url, token = jupyterlab
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # a workspace of its own, reset: only this notebook is open
    page.goto(f"{url}/lab/workspaces/{notebook.stem}/tree/{notebook.parent.name}/{notebook.name}?reset&token={token}",
              timeout=60_000)
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
    # the title cell rendered as HTML (markdown ran), the Colab badge is a link
    page.wait_for_selector(".jp-NotebookPanel .jp-MarkdownCell h1", timeout=30_000)
    assert page.locator(".jp-NotebookPanel a[href*='colab.research.google.com']").count() >= 1
    # the kernel started and went idle: ask the server about this notebook's session
    session = _wait_for_idle_kernel(url, token, f"{notebook.parent.name}/{notebook.name}")
    assert session["kernel"]["name"] == "python3", session
    kernel = page.locator("[data-jp-item-name='kernelName'], .jp-KernelName").first.inner_text()
    assert "Python 3" in kernel, kernel
    assert page.locator(".jp-Dialog").count() == 0, page.locator(".jp-Dialog").first.inner_text()
    # JupyterLab renders a long notebook's cells progressively (windowing): wait for the first ten
    page.wait_for_function("document.querySelectorAll('.jp-NotebookPanel .jp-Cell').length >= 10", timeout=30_000)
    cells = page.locator(".jp-NotebookPanel .jp-Cell").count()
    shots = build_dir() / "browser"
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / f"{notebook.stem}.png"))
    context.close()
    assert cells >= 10 and not errors, errors
