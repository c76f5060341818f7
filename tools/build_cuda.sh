#!/usr/bin/env bash
# make build-cuda: bpt against the CUDA 13.0 build of torch (torch==2.14.1, from the local
# wheel cache, in a venv of its own: .venv-cuda), configured with -DBPT_CUDA=ON into
# build-cuda/: the same targets as the CPU build, plus the CUDA kernels (csrc/ops/**/*.cu, for
# TORCH_CUDA_ARCH_LIST, default "8.0;9.0a": A100 and H100) and NCCL process groups. It
# compiles and links on a machine without a GPU; running needs one. The CPU build (make build)
# needs none of this.
#
# BPT_CUDA_PYTHON=/path/to/python builds against that interpreter's CUDA torch instead (a GPU
# machine with its own torch and no network; tools/gpu_kit.sh); it needs CMake >= 3.26 on the
# PATH or in it. BPT_CUDA_BUILD_DIR builds elsewhere than build-cuda/ (a check of the build
# alone: `import bpt`, the tests and the benchmarks look in build-cuda/).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${BPT_CUDA_PYTHON:-}" ]; then
  python=$BPT_CUDA_PYTHON
  cmake=$("$python" -c 'import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))' 2>/dev/null ||
          command -v cmake) || { echo "build_cuda: no CMake (pip's cmake module or cmake on the PATH)" >&2; exit 1; }
else
  VENV=.venv-cuda
  python=$VENV/bin/python
  cmake=$VENV/bin/cmake
  if ! "$python" -c 'import torch, cmake, pytest, transformers; assert torch.version.cuda' 2>/dev/null; then
    echo "build_cuda: preparing $VENV (torch==2.14.1 with CUDA 13.0, about 5.5 GB, CMake 4.1, pytest, transformers)"
    [ -x "$python" ] || python3 -m venv "$VENV"
    "$python" -m pip install -q "torch==2.14.1" "cmake==4.1.0" numpy pytest "transformers==5.24.0" 2>&1 |
      grep -v "is ignored: it is neither" || true  # pip's notes about absent local indexes
    "$python" -c 'import torch, cmake, pytest, transformers' ||
      { echo "build_cuda: pip could not install torch==2.14.1, cmake, pytest, transformers into $VENV" >&2; exit 1; }
  fi
  # `import bpt` from the venv, as tools/setup.sh does for .venv (it loads build-cuda/ here).
  echo "$PWD/python" > "$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/bpt.pth"
fi
"$python" -c 'import torch; assert torch.version.cuda, "not a CUDA build of torch"'
site=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
prefix=$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')
cuda_home=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}
echo "build_cuda: torch $("$python" -c 'import torch; print(torch.__version__)'), nvcc $cuda_home/bin/nvcc," \
  "architectures $TORCH_CUDA_ARCH_LIST"
extra=()
command -v ninja >/dev/null && extra+=(-G Ninja)
[ -e "$site/nvidia/cu13/lib/libnvrtc.so.13" ] && extra+=("-DCUDA_nvrtc_LIBRARY=$site/nvidia/cu13/lib/libnvrtc.so.13")
build=${BPT_CUDA_BUILD_DIR:-build-cuda}
"$cmake" -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DBPT_CUDA=ON \
  -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_CUDA_COMPILER="$cuda_home/bin/nvcc" "${extra[@]}" \
  -DBPT_CUDA_INCLUDE_DIRS="$site/nvidia/cu13/include;$site/nvidia/nccl/include"
"$cmake" --build "$build" -j "${JOBS:-$(nproc)}"
echo "build_cuda: ok ($build/)"
