import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def quick_start_commands() -> list[str]:
    section = ROOT.joinpath("README.md").read_text().split("## Quick start", 1)[1]
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quick_start_has_exactly_two_commands():
    install_and_run, install_and_test = quick_start_commands()
    assert install_and_run.startswith("./install.sh") and "mlflow run . -e main --env-manager local" in install_and_run
    assert "-e infer" in install_and_run
    assert install_and_test.startswith("./install.sh") and "pytest" in install_and_test


def test_ci_runs_the_readme_test_command():
    assert quick_start_commands()[1] in ROOT.joinpath(".ci/run").read_text().splitlines()


def test_mlproject_declares_every_stage():
    import yaml

    entry_points = yaml.safe_load(ROOT.joinpath("MLproject").read_text())["entry_points"]
    assert {"datagen", "finetune", "quantize", "evaluate", "promote", "infer", "main"} <= set(entry_points)
    for name, entry in entry_points.items():
        assert entry["command"].startswith(f"arenaflow {name} "), name


def test_conda_env_mirrors_the_pip_pins():
    import yaml

    pins = [l.strip() for l in ROOT.joinpath("requirements.txt").read_text().splitlines() if l.strip() and not l.startswith("#")]
    pip = next(d["pip"] for d in yaml.safe_load(ROOT.joinpath("conda.yaml").read_text())["dependencies"] if isinstance(d, dict))
    assert set(pins) <= set(pip)
