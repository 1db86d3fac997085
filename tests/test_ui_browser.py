"""End-to-end check of `arenaflow ui` in headless Chromium (Debian's chromium + chromium-driver).

`populate_store(tmp_path)` runs a small real pipeline into a temporary store (one recipe experiment,
two registered tiny models each scored by `evaluate`, `promote` setting the `champion` alias). `running_server` from
arenaflow.ui serves it; selenium drives the MLflow React UI through the compare view and the
registered-model page, saving a PNG screenshot at each step into $ARENAFLOW_SCREENSHOTS (default:
tmp_path/screenshots).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from arenaflow.ui import running_server

pytestmark = pytest.mark.slow  # a real browser over a real MLflow server

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ROOT = Path(__file__).resolve().parents[1]
# The embedded default recipe on tiny random models, scored by the transformers engine on 24 rows.
OVERRIDES = [
    "engine.backend=transformers", "train.max_valid_rows=24",
    f"data.files={ROOT / 'data' / 'mtbench_human_turn1.csv'},{ROOT / 'data' / 'pandalm_test.csv'}",
]


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

    from arenaflow import registry
    from arenaflow.models import build_tiny_llama
    from arenaflow.pipeline import evaluate, promote
    from arenaflow.recipe import load_recipe
    from arenaflow.tracking import stage_run

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
                versions.append(str(registry.register_checkpoint(
                    checkpoint, name, tags={"quantization": "none"}, description=f"tiny random Llama, seed {seed}").version))
            evaluate(recipe, model=f"models:/{name}/{versions[-1]}")
            promote(recipe, version=versions[-1])
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

# In the compare view, metric names and values are two react-virtualized grids whose cells line up
# by their `top`; return the values in the row of metric `arguments[0]`, left to right.
METRIC_ROW_JS = """
const name = arguments[0];
const link = [...document.querySelectorAll('a[title="Plot chart"]')].find(a => a.textContent.trim() === name);
if (!link) return null;
const cell = link.parentElement, top = cell.style.top;
let sec = cell;
while (sec && sec.querySelectorAll('.ReactVirtualized__Grid').length < 2) sec = sec.parentElement;
if (!sec) return null;
const grids = sec.querySelectorAll('.ReactVirtualized__Grid');
return [...grids[grids.length - 1].querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > div')]
  .filter(c => c.style.top === top)
  .sort((a, b) => parseFloat(a.style.left) - parseFloat(b.style.left))
  .map(c => c.textContent.trim());
"""


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

    def scroll_to(self, element) -> None:
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)

    def click(self, element) -> None:
        self.scroll_to(element)
        element.click()


def _find(browser: Browser, css: str, visible: bool = True):
    """The first element matching `css` (the first displayed one, unless `visible=False`), or None."""
    for element in browser.d.find_elements("css selector", css):
        if not visible or element.is_displayed():
            return element
    return None


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


def _parse_floats(cells: list[str]) -> list[float]:
    out = []
    for c in cells:
        try:
            out.append(float(c.replace(",", "")))
        except ValueError:
            pass
    return out


def test_compare_evaluate_runs(ui):
    browser, store = ui
    run_names = [run["name"] for run in store.eval_runs.values()]

    # 1. The experiment's runs table, filtered to the evaluate stage.
    browser.open(f"/experiments/{store.experiment_id}/runs?workflowType=machine_learning")
    search = browser.wait("the runs search box", lambda b: _find(b, '[data-testid="search-box"]'))
    browser.wait("the runs table", lambda b: "matching run" in b.body())
    search.send_keys('tags.stage = "evaluate"\n')
    browser.wait("the filter in the URL", lambda b: "searchFilter=tags.stage" in b.d.current_url)
    rows = {rid: f'[role="row"][row-id="{rid}"]' for rid in store.eval_runs}
    browser.wait(
        f"{len(rows)} evaluate runs listed",
        lambda b: all(_find(b, css) for css in rows.values()) and f"{len(rows)} matching runs" in b.body(),
    )
    browser.shot("01-experiment-evaluate-runs")

    # 2. Select both evaluate runs; the Compare button appears.
    for css in rows.values():
        box = browser.wait(
            "a run's checkbox", lambda b, css=css: _find(b, f"{css} input.ag-checkbox-input", visible=False)
        )
        browser.click(box)
    browser.wait(
        "both runs checked",
        lambda b: all(
            _find(b, f"{css} input.ag-checkbox-input:checked", visible=False) for css in rows.values()
        ),
    )
    compare = browser.wait(
        "the Compare button",
        lambda b: (btn := _find(b, '[data-testid="runs-compare-button"]')) and btn.is_enabled() and btn,
    )
    browser.shot("02-evaluate-runs-selected")

    # 3. The compare view: log_loss with both runs' values.
    browser.click(compare)
    browser.wait(
        "the compare-runs page",
        lambda b: "/compare-runs" in b.d.current_url and "Comparing 2 Runs" in b.body(),
    )
    assert all(rid in browser.d.current_url for rid in store.eval_runs), browser.d.current_url
    values = browser.wait(
        "log_loss values for both runs",
        lambda b: (v := b.d.execute_script(METRIC_ROW_JS, "log_loss")) and len(_parse_floats(v)) == 2 and v,
    )
    body = browser.body()
    for name in run_names:
        assert name in body, f"run name {name!r} missing from the compare view"
    metrics_header = browser.d.find_element(
        "xpath", "//div[contains(@class,'collapse-header')][normalize-space()='Metrics']"
    )
    browser.d.execute_script("arguments[0].scrollIntoView({block: 'start'})", metrics_header)
    browser.shot("03-compare-log-loss")
    shown = sorted(_parse_floats(values))
    expected = sorted(run["log_loss"] for run in store.eval_runs.values())
    assert shown == pytest.approx(expected, abs=1e-3), f"log_loss row shows {values}, expected {expected}"


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
    browser.shot("04-registered-model-champion")
    champion = store.champion
    # The alias is a cell of its own; the word also appears inside the `promotion` tag's reason.
    assert "@ champion" in rows[champion].splitlines(), (
        f"alias 'champion' not next to version {champion}: {rows[champion]!r}"
    )
    others = [v for v in store.model_versions if v != champion and "@ champion" in rows[v].splitlines()]
    assert not others, f"'champion' also shown on versions {others}"
    # The version's tags carry its evaluated log_loss.
    assert "log_loss" in rows[champion]


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
