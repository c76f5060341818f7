#!/usr/bin/env bash
# Compiles bpt's distributed layer (csrc/dist: process groups, FSDP, expert parallelism) against the CUDA build
# of torch with NCCL enabled (BPT_WITH_NCCL), on a machine without a GPU: the NCCL code paths
# are checked by the compiler even where they cannot run; then the CUDA op kernels
# (csrc/ops/**/*.cu) with nvcc, for sm_90. Object files only; nothing links or runs. Takes
# the CUDA torch from .venv-cuda (created here: torch==2.14.1, CUDA 13.0, about 5.5 GB from
# the local wheel cache).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-cuda
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import torch; assert torch.version.cuda' 2>/dev/null; then
  echo "check_cuda_dist: creating $VENV with torch==2.14.1 (CUDA 13.0)"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "torch==2.14.1" 2>&1 | grep -v "is ignored: it is neither" || true
fi
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
torch_dir=$site/torch
# nvcc's toolkit supplies the headers the pip CUDA wheels leave out (crt/host_config.h).
cuda_home=${CUDA_HOME:-/usr/local/cuda}
echo "check_cuda_dist: torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
out=build-cuda-check
mkdir -p "$out"
for src in csrc/dist/process_group.cpp csrc/dist/fsdp.cpp csrc/dist/expert_parallel.cpp; do
  echo "check_cuda_dist: compiling $src with NCCL"
  g++ -std=c++20 -O1 -c "$src" -o "$out/$(basename "$src" .cpp).o" -I. \
    -I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include" \
    -I"$site/nvidia/cu13/include" -I"$site/nvidia/nccl/include" -I"$cuda_home/include" \
    -DUSE_C10D_GLOO -DUSE_C10D_NCCL -DBPT_WITH_NCCL -DFMT_HEADER_ONLY -Wno-interference-size
done
nm -C "$out/process_group.o" | grep "c10d::ProcessGroupNCCL::ProcessGroupNCCL" >/dev/null ||
  { echo "check_cuda_dist: process_group.o does not construct ProcessGroupNCCL" >&2; exit 1; }
# The CUDA op kernels, as torch's extension builder would compile them.
while IFS= read -r src; do
  echo "check_cuda_dist: compiling $src with nvcc (sm_90)"
  "$cuda_home/bin/nvcc" -std=c++20 -O2 -c "$src" -o "$out/$(basename "$src" .cu).cu.o" -I. \
    -I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include" -I"$site/nvidia/cu13/include" \
    -I"$cuda_home/include" -gencode arch=compute_90,code=sm_90 --expt-relaxed-constexpr -Xcompiler -fPIC \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    -D__CUDA_NO_HALF2_OPERATORS__ -DFMT_HEADER_ONLY
done < <(find csrc/ops -name '*.cu' | sort)
echo "check_cuda_dist: ok (objects in $out/)"
