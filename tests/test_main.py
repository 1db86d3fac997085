"""`main` itself (tiny model, transformers engine): it reuses exactly the steps whose inputs did not change."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import mlflow
from mlflow import MlflowClient

from conftest import MTBENCH, RECIPE, TINY

from arenaflow.stages import main
from arenaflow.recipe import load_recipe
from arenaflow.step_identity import code_version, step_inputs, step_key

STEPS = ("datagen", "finetune", "quantize", "evaluate", "promote", "infer")


def _main(overrides, capsys) -> tuple[str, dict]:
    main.run(load_recipe(RECIPE, overrides), overrides)
    out = capsys.readouterr().out
    (parent,) = MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()], "tags.stage = 'main'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return out, parent.data.tags


def test_main_reuses_unchanged_steps_and_reruns_from_an_edited_key(store, capsys, monkeypatch):
    # each step runs `arenaflow <verb>` (MLproject) in a shell: this interpreter's venv first, as activated
    monkeypatch.setenv("PATH", f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    out, _ = _main(TINY, capsys)
    assert all(f"main: running {s} (no finished run" in out for s in STEPS), out

    out, tags = _main(TINY, capsys)  # nothing changed: every step reused, none run
    assert "main: running" not in out and all(f"main: reusing {s} run" in out for s in STEPS), out
    assert all("reused: same inputs" in tags[f"step_{s}"] for s in STEPS)

    edited = [*TINY, "quant.calibration_rows=6"]  # a key only quantize reads: the steps before it stay
    out, tags = _main(edited, capsys)
    assert "main: reusing datagen" in out and "main: reusing finetune" in out, out
    assert "main: running quantize (changed since run" in out and "recipe.quant" in tags["step_quantize"]
    for later in ("evaluate", "promote", "infer"):  # downstream of the new version
        assert f"main: running {later} (changed since run" in out and "step:" in tags[f"step_{later}"], out
    runs = MlflowClient().search_runs([mlflow.get_experiment_by_name("cpu-smollm2").experiment_id],
                                      "tags.`mlflow.project.entryPoint` = 'quantize'")
    assert len(runs) == 2


def test_a_changed_data_file_or_code_changes_the_step_identity(tmp_path):
    data = tmp_path / "rows.csv"
    shutil.copyfile(MTBENCH, data)
    recipe = load_recipe(RECIPE, [f"data.files={data}"])
    before = step_inputs("datagen", recipe, files=[data], code="c1")
    assert step_key(before) == step_key(step_inputs("datagen", recipe, files=[data], code="c1"))
    data.write_text(data.read_text().replace("?", "!", 1))  # one character of the content
    after = step_inputs("datagen", recipe, files=[data], code="c1")
    assert [k for k in before if before[k] != after[k]] == [f"file:{data}"]
    assert step_key(step_inputs("datagen", recipe, files=[data], code="c2")) != step_key(after)
    # A recipe section a stage does not read changes nothing for it; one it reads does.
    other = load_recipe(RECIPE, [f"data.files={data}", "quant.group_size=32"])
    assert step_key(step_inputs("datagen", other, files=[data], code="c1")) == step_key(after)
    assert step_key(step_inputs("quantize", other, code="c1")) != step_key(step_inputs("quantize", recipe, code="c1"))


def test_code_version_is_the_commit_plus_uncommitted_changes_under_src(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    (tmp_path / "notes.txt").write_text("not code\n")
    git("add", ".")
    git("commit", "-qm", "one")
    clean = code_version(tmp_path)
    assert len(clean) == 40 and "+" not in clean
    (tmp_path / "notes.txt").write_text("edited, still not code\n")
    assert code_version(tmp_path) == clean
    (tmp_path / "src" / "a.py").write_text("x = 2\n")
    edited = code_version(tmp_path)
    assert edited.startswith(clean + "+")
    (tmp_path / "src" / "b.py").write_text("y = 1\n")  # an untracked module counts too
    assert code_version(tmp_path) not in (clean, edited)
