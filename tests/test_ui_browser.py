"""End-to-end check of `arenaflow ui` in headless Chromium (Debian's chromium + chromium-driver).

`populate_store(tmp_path)` builds a small MLflow store shaped like the pipeline's output (one recipe
experiment, two `evaluate` runs, a registered model with a `champion` alias). `running_server` from
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

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
EXPERIMENT = "cpu-smollm2"
MODEL = "arenaflow"
# run name -> metrics; the values are distinctive so the compare table can be searched for them.
EVAL_RUNS = {
    "evaluate smollm2-135m cpu-smollm2 W4A16": {
        "log_loss": 1.0473,
        "accuracy": 0.4625,
        "samples_per_s": 12.5,
    },
    "evaluate smollm2-135m cpu-smollm2 FP32": {"log_loss": 0.9821, "accuracy": 0.5125, "samples_per_s": 7.25},
}


@dataclass
class Store:
    tracking_uri: str
    experiment_id: str
    eval_run_ids: list[str]  # in EVAL_RUNS order
    model_versions: list[str] = field(default_factory=list)  # "1", "2"; champion = the last


def populate_store(tmp_path: Path) -> Store:
    """A small store with what the pipeline will produce; swap for a real pipeline run later."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "mlruns").as_uri())
    client.create_registered_model(MODEL, description="arenaflow preference models")
    run_ids, versions = [], []
    for name, metrics in EVAL_RUNS.items():
        run = client.create_run(exp_id, run_name=name, tags={"stage": "evaluate", "recipe": EXPERIMENT})
        rid = run.info.run_id
        client.log_param(rid, "quantization", name.rsplit(" ", 1)[-1])
        for key, value in metrics.items():
            client.log_metric(rid, key, value)
        fig, ax = plt.subplots(figsize=(3, 3))
        ax.plot([0, 1], [0, 1], "--", color="grey")
        ax.plot([0.1, 0.5, 0.9], [0.15, 0.45, 0.8], "o-")
        ax.set_title(f"reliability {name.rsplit(' ', 1)[-1]}")
        client.log_figure(rid, fig, "plots/reliability.png")
        plt.close(fig)
        ckpt = tmp_path / f"ckpt-{len(run_ids)}"
        ckpt.mkdir()
        (ckpt / "config.json").write_text('{"model_type": "llama"}\n')
        client.log_artifacts(rid, str(ckpt), "checkpoint")
        client.set_terminated(rid)
        mv = client.create_model_version(MODEL, source=f"runs:/{rid}/checkpoint", run_id=rid)
        client.set_model_version_tag(MODEL, mv.version, "log_loss", str(metrics["log_loss"]))
        run_ids.append(rid)
        versions.append(str(mv.version))
    client.set_registered_model_alias(MODEL, "champion", versions[-1])
    return Store(uri, exp_id, run_ids, versions)


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
    run_names = list(EVAL_RUNS)

    # 1. The experiment's runs table, filtered to the evaluate stage.
    browser.open(f"/experiments/{store.experiment_id}/runs?workflowType=machine_learning")
    search = browser.wait("the runs search box", lambda b: _find(b, '[data-testid="search-box"]'))
    browser.wait("the runs table", lambda b: "matching run" in b.body())
    search.send_keys('tags.stage = "evaluate"\n')
    browser.wait("the filter in the URL", lambda b: "searchFilter=tags.stage" in b.d.current_url)
    rows = {rid: f'[role="row"][row-id="{rid}"]' for rid in store.eval_run_ids}
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
    assert all(rid in browser.d.current_url for rid in store.eval_run_ids), browser.d.current_url
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
    expected = sorted(m["log_loss"] for m in EVAL_RUNS.values())
    assert shown == pytest.approx(expected, abs=1e-3), f"log_loss row shows {values}, expected {expected}"


def test_registered_model_champion_alias(ui):
    browser, store = ui
    browser.open(f"/models/{MODEL}")
    version_rows = '[role="row"]:not(.table-isHeader)'

    def rows_by_version(b: Browser) -> dict[str, str] | None:
        texts = [r.text for r in b.d.find_elements("css selector", version_rows)]
        found = {
            t.split("\n", 1)[0].removeprefix("Version ").strip(): t for t in texts if t.startswith("Version ")
        }
        return found if set(store.model_versions) <= set(found) else None

    rows = browser.wait(f"versions {store.model_versions} of {MODEL}", rows_by_version)
    browser.shot("04-registered-model-champion")
    champion = store.model_versions[-1]
    assert "champion" in rows[champion], (
        f"alias 'champion' not next to version {champion}: {rows[champion]!r}"
    )
    others = [v for v in store.model_versions if v != champion and "champion" in rows[v]]
    assert not others, f"'champion' also shown on versions {others}"
    # The version tag carries the evaluated log_loss.
    assert str(list(EVAL_RUNS.values())[-1]["log_loss"]) in rows[champion]


def test_run_image_artifact_is_served(ui):
    browser, store = ui
    rid = store.eval_run_ids[0]
    browser.open(f"/experiments/{store.experiment_id}/runs/{rid}/artifacts/plots/reliability.png")
    browser.wait(
        "the reliability.png preview",
        lambda b: (
            "plots/reliability.png" in b.body()
            and b.d.execute_script(
                "return [...document.images].some(i => i.complete && i.naturalWidth > 0 && i.src.startsWith('blob:'))"
            )
        ),
    )
    browser.shot("05-run-image-artifact")
