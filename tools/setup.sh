#!/usr/bin/env bash
# Idempotent set-up for bpt: Debian build dependencies and the Python venv (.venv).
# A second run with nothing to do takes seconds: it checks before it installs.
set -euo pipefail
cd "$(dirname "$0")/.."

# Packages the C++ build needs. libgloo-dev supplies the Gloo headers the torch wheel
# lacks (c10d's ProcessGroupGloo from C++); sentencepiece gives spm_train for tokenizers;
# fortunes is the English text make demo trains on.
DEBS=(build-essential cmake ninja-build ccache pkg-config
      libsentencepiece-dev sentencepiece catch2
      libcli11-dev libtomlplusplus-dev nlohmann-json3-dev libgloo-dev
      fortunes)
# Pinned exactly: a range would pull a multi-GB CUDA build of torch.
TORCH_SPEC="torch==2.13.0"
# transformers: the reference the LLaMA tests compare against (it brings safetensors).
# peft: the reference the LoRA adapter export is loaded by (tests/python/test_finetune.py).
# matplotlib: tools/plot_metrics.py.
PY_PKGS=(numpy pytest transformers==5.24.0 peft==0.21.2 matplotlib)

missing=()
for p in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup: Debian packages present"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
want=("$TORCH_SPEC" "${PY_PKGS[@]}")
# True when every package in "$@" is installed (at exactly the version, where one is given).
have_py_pkgs() {
  .venv/bin/python - "$@" <<'PYEOF'
import sys
from importlib import metadata
for spec in sys.argv[1:]:
    name, _, version = spec.partition("==")
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        sys.exit(1)
    if version and have.split("+")[0] != version:  # 2.13.0+cpu is 2.13.0
        sys.exit(1)
PYEOF
}
if have_py_pkgs "${want[@]}"; then
  echo "setup: Python packages present in .venv (${want[*]})"
else
  echo "setup: installing Python packages into .venv: ${want[*]}"
  # pip warns about local index folders this machine lacks; those lines are noise.
  .venv/bin/python -m pip install -q "${want[@]}" 2>&1 | grep -v "is ignored: it is neither" || true
  have_py_pkgs "${want[@]}" || { echo "setup: pip could not install ${want[*]}" >&2; exit 1; }
fi
# `import bpt` from the venv: point it at python/ (the op library is found in build/).
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ "$(cat "$site/bpt.pth" 2>/dev/null)" != "$PWD/python" ]; then
  echo "$PWD/python" > "$site/bpt.pth"
  echo "setup: .venv imports bpt from $PWD/python"
fi
echo "setup: done"
