"""Screenshots of a sweep in the MLflow UI: the experiment's runs table with the sweep's parent run expanded, and the
compare view of its trials (the child runs; the parent alone when it has none).

    python bench/mlflow_view.py --tracking-uri sqlite:////tmp/view/mlflow.db --sweep view-smoke --out docs/mlflow

It starts `mlflow ui` on a free loopback port and drives headless Chromium (Debian's `chromium`) through the Chrome
DevTools Protocol, with `websocket-client`. Everything listens on and connects to 127.0.0.1. Exits 2 with one line
when Chromium or websocket-client is missing.

What it relies on in the UI (MLflow 3.x, read in 3.17's page and bundle; check them when MLflow changes):
- routes: `#/experiments/<id>/runs?searchFilter=<search, URL-quoted>`, `#/experiments/<id>/runs/<run id>`,
  `#/compare-runs?runs=<JSON list of run ids>&experiments=<JSON list of experiment ids>`;
- the runs table is an ag-grid: a run's row is `.ag-row[row-id="<run id>"]`, and a parent run's expand control is
  the `button` in its cell `[col-id="attributes.`Run Name`"]` (children are collapsed until it is clicked);
- the compare view's section headers hold `[aria-label="collapse <section>"]` and its switches are
  `button[role=switch][aria-label="<Parameters|Metrics> - Show diff only"]`;
- localStorage keys `mlflow.workflowType_v1`, `mlflow.assistant.panelOpen_v1`,
  `mlflow.assistant.fab.autoOpenedOnFirstLoad_v1` (below, UI_SETTINGS).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple, Optional

WINDOW = (1600, 1000)
COMPARE_SCALE = 0.8  # the compare view's tables are long: lay it out on a larger page
HOST = "127.0.0.1"


class Missing(Exception):
    """Something this script needs is not installed; the message names it."""


# --- the store ---


class Sweep(NamedTuple):
    experiment: str  # the experiment's id
    parent: str  # the sweep's run id
    children: list[str]  # its trials' run ids, in the order they started
    search: str  # the search that finds them all


def sweep_runs(uri: str, sweep: str, study: Optional[str]) -> Sweep:
    """The runs of `sweep`, found as the report finds them (densetune.results.store; imported here: MLflow and
    densetune take seconds to load)."""
    from mlflow import MlflowClient

    from densetune.files import ROLE, SWEEP
    from densetune.results.store import sweep_records

    try:
        runs = sweep_records(MlflowClient(uri), sweep, uri, study)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    runs = sorted(runs, key=lambda run: run.info.start_time)  # in the order they started
    parent = next(r for r in runs if r.data.tags.get(ROLE) == "sweep").info
    children = [r.info.run_id for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.run_id]
    return Sweep(parent.experiment_id, parent.run_id, children, f"tags.{SWEEP} = '{sweep}'")


# --- processes ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """End a process and everything it started (uvicorn's workers, Chromium's renderers): each runs in a session of
    its own, so its process group is exactly what it started."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            pass


def start_ui(uri: str, port: int, folder: Path) -> tuple[subprocess.Popen, Path]:
    """`mlflow ui` on the store, run in a scratch folder (its default artifact folder is relative to the current one);
    its output goes to a log, shown when it fails to start."""
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", HOST, "--port", str(port),
               "--workers", "1"]  # one page's requests; the default 4 each import MLflow, doubling the start
    log = folder / "mlflow-ui.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=folder, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return process, log


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    """Poll the UI's /health until it answers; a clear error if the server exits or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow ui exited ({process.returncode}) before answering:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow ui did not answer on {url}/health within {timeout:.0f}s:\n{log.read_text()[-2000:]}")


def require_websocket() -> None:
    try:
        import websocket  # noqa: F401  (websocket-client)
    except ImportError:
        raise Missing("websocket-client is not installed: pip install websocket-client") from None


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    raise Missing("headless Chromium is not installed: apt-get install chromium")


def start_chromium(binary: str, profile: Path) -> tuple[subprocess.Popen, int]:
    """Headless Chromium with DevTools on a port it picks itself (written to DevToolsActivePort in its profile)."""
    command = [
        binary, "--headless", f"--user-data-dir={profile}", "--remote-debugging-port=0",
        f"--remote-debugging-address={HOST}", f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars",
        "--no-first-run", "--no-default-browser-check", "--disable-gpu", "--disable-extensions", "about:blank",
    ]
    if os.geteuid() == 0:  # Chromium refuses to run as root with its sandbox on (containers, CI)
        command.insert(1, "--no-sandbox")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    active = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        if active.exists() and (lines := active.read_text().splitlines()):
            return process, int(lines[0])
        time.sleep(0.2)
    stop(process)
    raise RuntimeError(f"Chromium ({binary}) did not open its DevTools port within 30s")


# --- the DevTools protocol ---


class Page:
    """One browser tab, driven over its DevTools websocket: commands are answered in order, events are ignored."""

    def __init__(self, devtools_port: int):
        import websocket  # websocket-client: checked by require_websocket

        with urllib.request.urlopen(f"http://{HOST}:{devtools_port}/json/list", timeout=5) as response:
            target = next(t for t in json.load(response) if t["type"] == "page")
        # no Origin header: Chromium refuses DevTools connections from origins not named in --remote-allow-origins
        self.socket = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id = 0
        self.scale(1)

    def scale(self, factor: float) -> None:
        """Lay pages out on a window 1/factor times the size, drawn into the same pixels: a zoom out (or in)."""
        width, height = (round(side / factor) for side in WINDOW)
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=factor,
                  mobile=False)

    def close(self) -> None:
        self.socket.close()

    def send(self, method: str, **params: Any) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"in the page: {result['exceptionDetails'].get('exception', {}).get('description')}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def wait_for(self, expression: str, what: str, timeout: float = 30) -> Any:
        """Poll a JavaScript expression until it is truthy; `what` names it in the error when it never is."""
        deadline, error = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            try:
                if value := self.evaluate(expression):
                    return value
            except RuntimeError as e:  # the page is still loading: no body yet, or its context was just replaced
                error = f"; last error: {e}"
            time.sleep(0.25)
        raise RuntimeError(f"the UI never showed {what} (waited {timeout:.0f}s for `{expression}`){error}")

    def screenshot(self, path: Path) -> Path:
        time.sleep(1)  # let charts and fonts finish drawing after the last row appeared
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path


# --- the views ---

# MLflow 3.x's DOM, looked up in the page (see the module's docstring)
RUN_NAME_BUTTON = ".ag-row[row-id='{run}'] [col-id='attributes.`Run Name`'] button"  # a parent's expand control
VISUALIZATIONS = "[aria-label='collapse Visualizations']"
DIFF_ONLY = "button[role='switch'][aria-label='{table} - Show diff only'][aria-checked='false']"
UI_SETTINGS = {
    "mlflow.workflowType_v1": json.dumps("machine_learning"),
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
    "mlflow.assistant.panelOpen_v1": "false",
}


def row_shown(run_ids: list[str]) -> str:
    """A JavaScript expression: is one of these runs' rows in the runs table? (One: the grid renders only the rows
    in and near the window.)"""
    return f"{json.dumps(run_ids)}.some(id => document.querySelector(`.ag-row[row-id='${{id}}']`))"


def text_shown(*texts: str) -> str:
    """A JavaScript expression: does the page show all these texts?"""
    return " && ".join(f"!!document.body?.innerText.includes({json.dumps(t)})" for t in texts)


def click(page: Page, selector: str) -> bool:
    """Click the first element matching `selector`; whether there was one."""
    return page.evaluate(f"(e => (e?.click(), !!e))(document.querySelector({json.dumps(selector)}))")


def seed_settings(page: Page, ui: str) -> None:
    """Before the app first loads: the UI's settings in the origin's localStorage (MLflow 3.x keys). Model training
    rather than GenAI, and the MLflow Assistant's panel closed (it opens by itself on a first visit from loopback and
    takes a third of the window). Unknown keys are ignored, so a later MLflow at worst shows its defaults."""
    page.open(f"{ui}/health")  # a plain page of the same origin, which loads no app
    page.wait_for("document.readyState === 'complete' && location.pathname === '/health'", "the server's /health")
    page.evaluate(f"Object.entries({json.dumps(UI_SETTINGS)}).forEach(([k, v]) => localStorage.setItem(k, v))")


def experiment_view(page: Page, ui: str, sweep: Sweep, out: Path) -> Path:
    # the table filtered to the sweep's runs, so that its run is at hand however many other sweeps the study holds
    page.open(f"{ui}/#/experiments/{sweep.experiment}/runs?searchFilter={urllib.parse.quote(sweep.search)}")
    page.wait_for(row_shown([sweep.parent]), "the sweep's run in the runs table", timeout=60)
    if sweep.children and not page.evaluate(row_shown(sweep.children)):  # collapsed under their parent
        expand = RUN_NAME_BUTTON.format(run=sweep.parent)
        if not click(page, expand):
            raise RuntimeError(f"found no expand control in the sweep run's row ({expand})")
        page.wait_for(row_shown(sweep.children), "the trials' rows under the sweep's run")
    return page.screenshot(out / "experiment.png")


def compare_view(page: Page, ui: str, sweep: Sweep, out: Path) -> Path:
    runs = sweep.children or [sweep.parent]
    page.scale(COMPARE_SCALE)
    page.open(f"{ui}/#/compare-runs?runs={json.dumps(runs)}&experiments={json.dumps([sweep.experiment])}")
    page.wait_for(text_shown("Run details", "Parameters", "Metrics"), "the compare view's params and metrics")
    # Fold the plot away so the tables fit in the window, and with two runs or more show only the params and metrics
    # that differ between them: the searched params and what follows from them, and the results that vary (the
    # metrics' table scrolls inside a box of its own, which holds only some ten rows).
    click(page, VISUALIZATIONS)
    if len(runs) > 1:
        for table in ("Parameters", "Metrics"):
            click(page, DIFF_ONLY.format(table=table))
    shot = page.screenshot(out / "compare.png")
    page.scale(1)
    return shot


def parent_view(page: Page, ui: str, sweep: Sweep, out: Path) -> Path:
    page.open(f"{ui}/#/experiments/{sweep.experiment}/runs/{sweep.parent}")
    page.wait_for(text_shown("Parameters"), "the sweep run's page")
    return page.screenshot(out / "parent.png")


# --- the whole ---


def screenshots(uri: str, sweep: str, out: Path, study: Optional[str] = None, parent_page: bool = False) -> list[Path]:
    """Start the UI and Chromium, save the views, stop both (also on error or Ctrl-C)."""
    chromium = find_chromium()
    require_websocket()
    runs = sweep_runs(uri, sweep, study)
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:  # undone in reverse: the tab, Chromium, the server, then the scratch folder
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mlflow-view-")))
        port = free_port()
        server, log = start_ui(uri, port, scratch)
        stack.callback(stop, server)
        ui = f"http://{HOST}:{port}"
        browser, devtools = start_chromium(chromium, scratch / "profile")  # starts while the server does
        stack.callback(stop, browser)
        wait_ready(ui, server, log)
        page = Page(devtools)
        stack.callback(page.close)
        seed_settings(page, ui)
        written = [experiment_view(page, ui, runs, out), compare_view(page, ui, runs, out)]
        if parent_page:
            written.append(parent_view(page, ui, runs, out))
        return written


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True, help="the sweep's store, e.g. sqlite:////abs/path/mlflow.db")
    parser.add_argument("--sweep", required=True, help="the sweep's name (its parent run's `sweep` tag)")
    parser.add_argument("--out", required=True, type=Path, help="folder for experiment.png and compare.png")
    parser.add_argument("--study", help="the MLflow experiment (study) to look in (default: the sweep run's own)")
    parser.add_argument("--parent-page", action="store_true", help="also save the sweep run's page as parent.png")
    args = parser.parse_args(argv)
    try:
        written = screenshots(args.tracking_uri, args.sweep, args.out, args.study, args.parent_page)
    except Missing as missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # the UI or Chromium did not do what was expected: say what, without a traceback
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the UI and Chromium were stopped on the way out
        return 130
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds like Ctrl-C does: the UI and Chromium stop
    sys.exit(main())
