"""The retrieval browser in a real JupyterLab, driven by headless Chromium (Selenium): the widget's
controls and its figure must appear in the page, not only in the kernel.

Needs the Debian packages ``chromium`` and ``chromium-driver`` (``make browser``); skipped with the
reason when they are absent. Slow (a JupyterLab server, a kernel and a browser): about a minute.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCREENSHOT = Path(__file__).resolve().parent.parent / "runs" / "browser" / "screenshot.png"
NOTEBOOK_CELL = """\
from nbsrc.widgets import retrieval_browser, widget_frontend_connected
browser = retrieval_browser("runs", k=4)
print("widget frontend connected:", widget_frontend_connected())
browser"""


def _browser_binaries() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("headless Chromium not installed (need the `chromium` and `chromedriver` commands): "
                    "apt-get install -y chromium chromium-driver  (or `make browser`)")
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lab_root(tmp_path: Path) -> Path:
    """A folder holding a tiny finished run (off-the-shelf, digits) and a notebook that shows the
    retrieval browser on it, with the ``nbsrc`` kernel."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    from nbsrc.config import ExperimentConfig
    from nbsrc.experiment import run_experiment

    root = tmp_path / "lab"
    root.mkdir()
    run_experiment(ExperimentConfig(
        name="tiny0", runs_dir=str(root / "runs"), dataset="digits", img_size=8, patch_size=4,
        iterations=0, lam=0.0, batch_size=16, m_per_class=4, eval_per_class=10, progress=False))
    nb = new_notebook(cells=[new_code_cell(NOTEBOOK_CELL)], metadata={
        "kernelspec": {"name": "nbsrc", "display_name": "Python (nbsrc)", "language": "python"}})
    nbformat.write(nb, root / "explore.ipynb")
    return root


def _start_lab(root: Path, tmp_path: Path, env: dict, attempts: int = 3):
    """``jupyter lab`` on 127.0.0.1 at a free port with a token; retried on another port if it
    does not answer within two minutes."""
    token = uuid.uuid4().hex
    jupyter = str(Path(sys.executable).parent / "jupyter")
    for attempt in range(attempts):
        port = _free_port()
        cmd = [jupyter, "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
               "--LabApp.expose_app_in_browser=True", f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
               f"--LabApp.user_settings_dir={tmp_path / 'settings'}"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")
        log = open(tmp_path / f"lab{attempt}.log", "wb")
        proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        return proc, port, token, log
            except OSError:
                time.sleep(1)
        _stop(proc, log)
    pytest.fail(f"jupyter lab did not start in {attempts} attempts; see {tmp_path}/lab*.log:\n"
                + (tmp_path / f"lab{attempts - 1}.log").read_text(errors="replace")[-2000:])


def _stop(proc: subprocess.Popen, log) -> None:
    """Stop the server we started and its kernels (its own process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
    log.close()


def _chrome(chromium: str, driver_path: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    driver.set_page_load_timeout(120)
    return driver


def _wait_for(driver, css: str, timeout: float):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.5).until(
        EC.presence_of_element_located((By.CSS_SELECTOR, css)))


def _accept_dialogs(driver) -> None:
    """Accept any JupyterLab dialog in the way (e.g. "Select Kernel", preselected to nbsrc)."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog .jp-Dialog-button.jp-mod-accept"):
        try:
            button.click()
        except WebDriverException:
            pass


def test_retrieval_browser_renders_in_jupyterlab(tmp_path):
    from selenium.common.exceptions import TimeoutException, WebDriverException
    from selenium.webdriver.common.by import By

    from nbsrc.paper.notebooks import _default_kernel

    chromium, driver_path = _browser_binaries()
    t0 = time.monotonic()
    assert _default_kernel() == "nbsrc", "the nbsrc kernel could not be registered in this venv"
    share = str(Path(sys.prefix) / "share" / "jupyter")
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    env["JUPYTER_PATH"] = os.pathsep.join([share] + [p for p in env.get("JUPYTER_PATH", "").split(os.pathsep)
                                                     if p and p != share])
    news = tmp_path / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text('{"fetchNews": "false", "checkForUpdates": false}')
    root = _lab_root(tmp_path)
    proc, port, token, log = _start_lab(root, tmp_path, env)
    driver = None
    try:
        driver = _chrome(chromium, driver_path)
        driver.get(f"http://127.0.0.1:{port}/lab/tree/explore.ipynb?token={token}")
        _wait_for(driver, ".jp-Notebook .jp-Cell", 180)
        time.sleep(3)  # let a kernel dialog, if any, open before it is accepted
        _accept_dialogs(driver)
        # Run all cells through JupyterLab's own command, until the widget appears (the kernel may
        # still be starting on the first try).
        slider = None
        for _ in range(6):
            _accept_dialogs(driver)
            try:
                driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")
            except WebDriverException:
                time.sleep(5)
                continue
            try:
                slider = _wait_for(driver, ".jupyter-widgets.widget-slider", 60)
                break
            except TimeoutException:
                continue
        assert slider is not None, "the retrieval browser's slider never appeared in JupyterLab"
        img = _wait_for(driver, ".jupyter-widgets .jp-OutputArea-output img, .widget-output img", 60)
        assert img.size["width"] > 50, "the retrieval grid image in the widget's output is empty"
        assert driver.find_elements(By.CSS_SELECTOR, ".jupyter-widgets.widget-dropdown select")
        text = driver.find_element(By.CSS_SELECTOR, ".jp-Notebook").text
        assert "widget frontend connected: True" in text, text[-500:]
        # ... so the figure is drawn once, inside the widget, with no static copy beside it
        assert len(driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-OutputArea-output img")) == 1
        _accept_dialogs(driver)
        time.sleep(1)
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(SCREENSHOT))
        data = SCREENSHOT.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    finally:
        if driver is not None:
            driver.quit()
        _stop(proc, log)
    print(f"browser test took {time.monotonic() - t0:.0f} s")
