"""End-to-end check of `arenaflow ui` in headless Chromium (Debian's chromium + chromium-driver).

`populate_store(tmp_path)` runs a small real pipeline into a temporary store (one recipe experiment,
two registered tiny models each scored by `evaluate`, `promote` setting the `champion` alias). `running_server` from
arenaflow.ui serves it; selenium drives the MLflow React UI through the compare view and the
registered-model page, saving a PNG screenshot at each step into $ARENAFLOW_SCREENSHOTS (default:
tmp_path/screenshots).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

from arenaflow.stages.ui import running_server

pytestmark = pytest.mark.slow  # a real browser over a real MLflow server

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ROOT = Path(__file__).resolve().parents[1]
# The embedded default recipe on tiny random models, scored by the transformers engine on 24 rows.
OVERRIDES_FILES = (ROOT / "data" / "mtbench_human_turn1.csv", ROOT / "data" / "pandalm_test.csv")
OVERRIDES = ["engine.backend=transformers", "train.max_valid_rows=24", "data.files=" + ",".join(map(str, OVERRIDES_FILES))]


@dataclass
class Store:
    tracking_uri: str
    experiment_id: str
    model: str
    eval_runs: dict[str, dict]  # run id -> {"name": run name, "log_loss": value}
    model_versions: list[str] = field(default_factory=list)
    champion: str = ""


def populate_store(tmp_path: Path) -> Store:
    """A small real pipeline into a temporary store: two tiny random checkpoints registered as
    versions, each evaluated on the same validation rows, then promoted in turn."""
    from mlflow import MlflowClient

    from arenaflow.stages import registry
    from arenaflow.data import load_rows
    from arenaflow.models import build_tiny_llama
    from arenaflow.stages import evaluate, promote
    from arenaflow.recipe import load_recipe
    from arenaflow.stages.runs import stage_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(tmp_path)  # run artifacts (./mlruns) stay in the temporary folder
        recipe = load_recipe(ROOT / "experiments" / "cpu-smollm2.yaml", OVERRIDES)
        name = recipe.registry.model_name
        versions = []
        for seed in (0, 1):
            checkpoint = build_tiny_llama(tmp_path / f"tiny-llama-{seed}", seed=seed)
            with stage_run(recipe, "quantize", model=f"tiny:llama seed {seed}"):
                versions.append(str(registry.register_model(
                    checkpoint, name, recipe, load_rows(OVERRIDES_FILES[1]).head(3), tags={"quantization": "none"},
                    description=f"tiny random Llama, seed {seed}").version))
            evaluate.run(recipe, model=f"models:/{name}/{versions[-1]}")
            promote.run(recipe, version=versions[-1])
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment_id = client.get_experiment_by_name(recipe.name).experiment_id
        runs = client.search_runs([experiment_id], filter_string="tags.stage = 'evaluate'")
        eval_runs = {r.info.run_id: {"name": r.info.run_name, "log_loss": r.data.metrics["log_loss"]} for r in runs}
        champion = registry.alias_version(name, recipe.registry.alias)
    return Store(uri, experiment_id, name, eval_runs, versions, champion)


# ---------------------------------------------------------------------------------------------------
# Browser plumbing

WAIT_S = 120  # the MLflow React UI loads slowly on 2 busy cores; waits are generous, never asserted
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--window-size=1600,1000",
    # Closed network: stop Chromium's own background connections (they are refused, many at a time).
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
]
# localStorage keys of MLflow 3.17's UI: keep the "MLflow Assistant" side panel closed.
QUIET_UI = {"mlflow.assistant.panelOpen_v1": "false", "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true"}



class Browser:
    """A selenium Chrome driver with screenshot-on-every-step and descriptive waits."""

    def __init__(self, driver, base_url: str, shots: Path):
        self.d, self.base, self.shots = driver, base_url, shots

    def body(self) -> str:
        from selenium.common.exceptions import WebDriverException

        try:
            return self.d.find_element("tag name", "body").text
        except WebDriverException:  # page mid-navigation
            return ""

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.d.save_screenshot(str(path))
        return path

    def open(self, route: str) -> None:
        self.d.get(f"{self.base}/#{route}")

    def wait(self, what: str, cond, timeout: float = WAIT_S):
        """Wait until `cond(self)` is truthy and return it; on timeout, screenshot and fail with `what`."""
        from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(
                self.d, timeout, poll_frequency=0.5, ignored_exceptions=(StaleElementReferenceException,)
            ).until(lambda _: cond(self))
        except TimeoutException:
            failed = self.shot(f"FAILED-{what.replace(' ', '-')[:60]}")
            pytest.fail(
                f"timed out after {timeout:.0f} s waiting for: {what}\nurl: {self.d.current_url}\n"
                f"screenshot: {failed}\npage text:\n{self.body()[:3000]}"
            )


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip(
            f"needs Debian's chromium + chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); run .ci/install-browser.sh"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    root = tmp_path_factory.mktemp("ui")
    shots = Path(os.environ.get("ARENAFLOW_SCREENSHOTS") or root / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    store = populate_store(root)

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM  # with an explicit driver path, selenium-manager downloads nothing
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={root / 'chromium-profile'}"]:
        opts.add_argument(flag)
    with running_server(store.tracking_uri, port=0, log=root / "mlflow-server.log") as server:
        driver = webdriver.Chrome(
            service=Service(CHROMEDRIVER, log_output=str(root / "chromedriver.log")), options=opts
        )
        try:
            driver.set_page_load_timeout(WAIT_S)
            browser = Browser(driver, server.url, shots)
            driver.get(f"{server.url}/health")  # same origin as the UI: seed its localStorage
            for key, value in QUIET_UI.items():
                driver.execute_script("localStorage.setItem(arguments[0], arguments[1])", key, value)
            print(f"\nscreenshots: {shots}")
            yield browser, store
        finally:
            driver.quit()


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+\.\d+", text)]


def _shows(text: str, value: float, tolerance: float = 1e-3) -> bool:
    return any(abs(x - value) < tolerance for x in _numbers(text))


def test_compare_evaluate_runs(ui):
    """What a user compares: the two evaluate runs side by side with their names and log_loss."""
    browser, store = ui
    ids = json.dumps(list(store.eval_runs))
    browser.open(f"/compare-runs?runs={quote(ids)}&experiments={quote(json.dumps([store.experiment_id]))}")
    browser.wait("the compare-runs page with both runs' names and log_loss", lambda b: (
        "Comparing 2 Runs" in (body := b.body()) and "log_loss" in body
        and all(run["name"] in body and _shows(body, run["log_loss"]) for run in store.eval_runs.values())))
    browser.shot("01-compare-evaluate-runs")


def test_models_view_lists_versions_with_log_loss(ui):
    """MLflow 3's Models view of the experiment: each registered version's model with its log_loss."""
    browser, store = ui
    browser.d.set_window_size(3200, 1000)  # the metric columns come after the model's attributes
    browser.open(f"/experiments/{store.experiment_id}/models?workflowType=machine_learning")
    browser.wait("both models with their log_loss", lambda b: (
        "log_loss" in (body := b.body()) and all(_shows(body, run["log_loss"]) for run in store.eval_runs.values())))
    browser.shot("02-experiment-models")
    browser.d.set_window_size(1600, 1000)


def test_registered_model_champion_alias(ui):
    browser, store = ui
    browser.open(f"/models/{store.model}")
    version_rows = '[role="row"]:not(.table-isHeader)'

    def rows_by_version(b: Browser) -> dict[str, str] | None:
        texts = [r.text for r in b.d.find_elements("css selector", version_rows)]
        found = {
            t.split("\n", 1)[0].removeprefix("Version ").strip(): t for t in texts if t.startswith("Version ")
        }
        return found if set(store.model_versions) <= set(found) else None

    rows = browser.wait(f"versions {store.model_versions} of {store.model}", rows_by_version)
    browser.shot("03-registered-model-champion")
    champion = store.champion
    # The alias is a cell of its own; the word also appears inside the `promotion` tag's reason.
    assert "@ champion" in rows[champion].splitlines(), (
        f"alias 'champion' not next to version {champion}: {rows[champion]!r}"
    )
    others = [v for v in store.model_versions if v != champion and "@ champion" in rows[v].splitlines()]
    assert not others, f"'champion' also shown on versions {others}"
    browser.open(f"/models/{store.model}/versions/{champion}")
    browser.wait("the champion version's description", lambda b: f"tiny random Llama, seed {int(champion) - 1}" in b.body())
    browser.shot("04-champion-version")


def test_run_image_artifact_is_served(ui):
    browser, store = ui
    rid = next(iter(store.eval_runs))
    browser.open(f"/experiments/{store.experiment_id}/runs/{rid}/artifacts/plots/calibration.png")
    browser.wait(
        "the calibration.png preview",
        lambda b: (
            "plots/calibration.png" in b.body()
            and b.d.execute_script(
                "return [...document.images].some(i => i.complete && i.naturalWidth > 0 && i.src.startsWith('blob:'))"
            )
        ),
    )
    browser.shot("05-run-image-artifact")
