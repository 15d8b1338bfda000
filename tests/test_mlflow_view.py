"""bench/mlflow_view.py: screenshots of a sweep in the MLflow UI, taken by headless Chromium. Skipped without it,
except under CI (CI set, as .ci/run sets it, which installs Chromium first): there it fails, naming what is missing."""

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def under_ci() -> bool:
    """CI is set and not 0/false (.ci/run sets CI=1; CI services set CI=true)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def load_view():
    path = ROOT / "bench" / "mlflow_view.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_sweep(uri: str) -> None:
    """A sweep's run and two trials' runs under it, as SweepTracker records them, without Ray."""
    from mlflow import MlflowClient

    from densetune.config import TrialConfig
    from densetune.files import ROLE, SWEEP
    from densetune.sweep.record import SweepTracker, TrackedSweep, check_tracking_uri

    check_tracking_uri(uri)
    sweep = TrackedSweep(uri, "a_study", "looked_at", {"search": "grid"}, ["rank"])
    tracker = SweepTracker(sweep, TrialConfig.from_dict)
    parent = tracker.parent_run_id()
    client = MlflowClient(uri)
    for rank, loss in ((4, 2.5), (8, 2.25)):
        tags = {ROLE: "trial", SWEEP: "looked_at", "mlflow.parentRunId": parent}
        run = client.create_run(tracker.experiment_id, run_name=f"rank={rank}", tags=tags).info.run_id
        client.log_param(run, "rank", rank)
        for step in range(3):
            client.log_metric(run, "loss", loss + 1 - step / 2, step=step)
        client.log_metric(run, "accuracy/average", rank / 16, step=2)
        client.set_terminated(run)
    client.set_terminated(parent)


def test_the_sweep_is_shown_expanded_and_compared(tmp_path):
    view = load_view()
    missing = None
    try:  # the script's own checks, whose messages say what to install
        view.find_chromium()
        view.require_websocket()
    except view.Missing as error:
        missing = str(error)
    if missing and under_ci():  # CI must check the UI: .ci/run installs chromium where `chromium` is not on PATH
        pytest.fail(f"CI is set, and the MLflow UI check cannot start a browser: {missing}", pytrace=False)
    if missing:
        pytest.skip(missing)
    from PIL import Image

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    make_sweep(uri)

    # the script fails (exit 1) when the trials' rows never show under the expanded sweep run, or the compare view
    # never shows its params and metrics
    assert view.main(["--tracking-uri", uri, "--sweep", "looked_at", "--out", str(tmp_path / "shots")]) == 0
    for name in ("experiment.png", "compare.png"):
        with Image.open(tmp_path / "shots" / name) as image:
            assert image.format == "PNG" and image.size == view.WINDOW
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
            assert len(colours) > 50, f"{name} is nearly blank: {len(colours)} colours"


def test_an_unknown_sweep_is_named(tmp_path):
    view = load_view()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    make_sweep(uri)
    with pytest.raises(SystemExit, match="no sweep named 'other'"):
        view.sweep_runs(uri, "other", None)
