#!/usr/bin/env bash
# Idempotent install into a virtual environment (default .venv; VENV=... to change).
#   ./setup_flux_optimized.sh          runtime dependencies
#   ./setup_flux_optimized.sh --dev    plus test and lint tools, and the browser test's Playwright and chromium
#                                      (Debian's package, through apt-get when it is missing)
#   ./setup_flux_optimized.sh --ray    plus Ray Serve (requirements-ray.txt; also FLUX_INSTALL_RAY=1)
# Flags can be combined (--dev --ray: what CI runs); an unknown one is refused.
# torch: a CUDA build where nvidia-smi sees a GPU, otherwise a CPU build. Override with
# TORCH_SPEC (e.g. "torch==2.11.0") and TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu).
# Nothing is ever copied into site-packages by hand.
set -euo pipefail
cd "$(dirname "$0")"

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
REQUIREMENTS=requirements.txt
DEV=0
RAY="${FLUX_INSTALL_RAY:-0}"
for flag in "$@"; do
  case "$flag" in
    --dev) DEV=1; REQUIREMENTS=requirements-dev.txt ;;
    --ray) RAY=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "unknown option: $flag (see $0 --help)" >&2; exit 2 ;;
  esac
done

# The browser tests drive Debian's chromium (Playwright cannot download its own browser here). Missing and not
# installable (no apt-get, not root): said here, and those tests skip with the reason (outside CI).
install_chromium() {
  if command -v chromium >/dev/null 2>&1; then
    return
  fi
  local sudo=()
  if [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo=(sudo -n)
    else
      echo "chromium not installed (not root, no sudo): the browser tests will skip; install the chromium package"
      return
    fi
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium not installed and apt-get is unavailable: the browser tests will skip; install chromium"
    return
  fi
  echo "installing chromium (apt-get) for the browser tests"
  if ! { "${sudo[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq \
      --no-install-recommends chromium; } >/dev/null; then
    echo "chromium could not be installed through apt-get: the browser tests will skip (CI fails them)"
  fi
}

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

HAS_GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  HAS_GPU=1
  DEFAULT_TORCH="torch"          # PyPI's Linux wheels are CUDA builds
else
  DEFAULT_TORCH="torch==2.13.0"  # a CPU machine: a pinned release (a CPU build where one is available)
fi
TORCH_SPEC="${TORCH_SPEC:-$DEFAULT_TORCH}"
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "installing $TORCH_SPEC"
  if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    "${PIP[@]}" install -q "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
  else
    "${PIP[@]}" install -q "$TORCH_SPEC"
  fi
fi

echo "installing $REQUIREMENTS"
# constraints.txt pins the versions the tests last passed with (CONSTRAINTS= to install without them).
CONSTRAINTS="${CONSTRAINTS-constraints.txt}"
"${PIP[@]}" install -q -r "$REQUIREMENTS" ${CONSTRAINTS:+-c "$CONSTRAINTS"}
if [[ "$RAY" == 1 ]]; then
  echo "installing requirements-ray.txt (Ray Serve)"
  "${PIP[@]}" install -q -r requirements-ray.txt ${CONSTRAINTS:+-c "$CONSTRAINTS"}
fi
if [[ "$DEV" == 1 ]]; then
  echo "installing requirements-browser.txt (Playwright, for the browser tests)"
  "${PIP[@]}" install -q -r requirements-browser.txt ${CONSTRAINTS:+-c "$CONSTRAINTS"}
  install_chromium
fi
if [[ "$HAS_GPU" == 1 ]]; then
  echo "installing requirements-gpu.txt (torchao, fa3-fwd)"
  "${PIP[@]}" install -q -r requirements-gpu.txt || echo "GPU extras not installed: /health will report them unavailable"
fi
"$VENV/bin/python" -c "import torch, diffusers; print(f'torch {torch.__version__} (cuda: {torch.cuda.is_available()}), diffusers {diffusers.__version__}')"
