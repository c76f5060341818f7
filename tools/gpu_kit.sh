#!/usr/bin/env bash
# For a GPU machine that has a CUDA torch, CMake and nvcc, but neither the Debian packages the
# C++ build needs nor a network (the kind docs/cuda.md describes):
#
#   tools/gpu_kit.sh prepare       on a Debian machine with apt and a network: downloads those
#                                  packages and unpacks them into .gpu-kit/root (git ignores it;
#                                  copy it to the GPU machine with the checkout, about 8 MB;
#                                  Debian 12 amd64 packages, for an x86-64 machine)
#   tools/gpu_kit.sh build         there: builds build-cuda/ against python3's torch, with the
#                                  kit's headers and libraries (BPT_CUDA_PYTHON, tools/build_cuda.sh)
#   tools/gpu_kit.sh test OUT      there: the `cuda` tests, a GPU required (BPT_REQUIRE_CUDA=1);
#                                  the log and a JUnit file into OUT
#   tools/gpu_kit.sh bench OUT [NAME...]
#                                  there: the GPU benchmarks (attention, train, max_seq,
#                                  bitlinear; all without NAMEs) with --device cuda, JSON and
#                                  logs into OUT. BENCH_ARGS adds arguments (say --quick)
#
# Each step is one command, so a GPU lent for a short time goes to the steps, not to set-up.
# OUT may be relative to the directory the script is called from.
set -euo pipefail
BENCHES=(attention train max_seq bitlinear)
usage() {
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
out=""
if [[ "${1:-}" == test || "${1:-}" == bench ]]; then
  [ $# -ge 2 ] || usage
  out=$(realpath -m -- "$2")
fi
cd "$(dirname "$0")/.."
KIT=$PWD/.gpu-kit
ROOT=$KIT/root
# What CMakeLists.txt finds outside torch: Catch2, sentencepiece (pkg-config), CLI11, toml++,
# nlohmann-json and the Gloo headers; pkg-config itself.
DEBS=(catch2 libsentencepiece-dev libsentencepiece0 libcli11-dev libtomlplusplus-dev libtomlplusplus3
      nlohmann-json3-dev libgloo-dev pkgconf pkgconf-bin libpkgconf3)

# The kit's files ahead of the system's, for CMake, the compiler, the linker and pkg-config.
use_kit() {
  [ -d "$ROOT/usr" ] || { echo "gpu_kit: no $ROOT: run 'tools/gpu_kit.sh prepare' where apt works" >&2; exit 2; }
  local lib=$ROOT/usr/lib/x86_64-linux-gnu
  export PATH=$ROOT/usr/bin:$PATH
  export CMAKE_PREFIX_PATH=$ROOT/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}
  export CPATH=$ROOT/usr/include${CPATH:+:$CPATH}
  export LIBRARY_PATH=$lib${LIBRARY_PATH:+:$LIBRARY_PATH}
  export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  # The .pc files say prefix=/usr: the sysroot puts the kit in front of their paths.
  export PKG_CONFIG_PATH=$lib/pkgconfig:$ROOT/usr/share/pkgconfig
  export PKG_CONFIG_SYSROOT_DIR=$ROOT
  export PKG_CONFIG_LIBDIR=$lib/pkgconfig
}

case "${1:-}" in
  prepare)  # into a new folder, swapped in only when every package unpacked
    new=$(mktemp -d "$PWD/.gpu-kit-new.XXXXXX")
    trap 'rm -rf "$new"' EXIT
    mkdir -p "$new/debs" "$new/root"
    (cd "$new/debs" && apt-get download "${DEBS[@]}")
    for deb in "$new"/debs/*.deb; do dpkg -x "$deb" "$new/root"; done
    rm -rf "$new/debs" "$new/root/usr/share/doc" "$new/root/usr/share/man"
    rm -rf "$KIT"
    mv "$new" "$KIT"
    echo "gpu_kit: $(du -sh "$ROOT" | cut -f1) in $ROOT"
    ;;
  build)
    use_kit
    BPT_CUDA_PYTHON=${BPT_CUDA_PYTHON:-python3} tools/build_cuda.sh
    ;;
  test)
    use_kit
    mkdir -p "$out"
    BPT_REQUIRE_CUDA=1 PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH} "${BPT_CUDA_PYTHON:-python3}" -m pytest \
      -m cuda tests/python/test_cuda.py -v --junitxml="$out/cuda_tests.xml" 2>&1 | tee "$out/cuda_tests.log"
    ;;
  bench)
    shift 2
    names=("$@")
    ((${#names[@]})) || names=("${BENCHES[@]}")
    for bench in "${names[@]}"; do
      if [[ " ${BENCHES[*]} " != *" $bench "* ]]; then
        echo "gpu_kit: no GPU benchmark '$bench' (${BENCHES[*]})" >&2
        exit 2
      fi
    done
    use_kit
    mkdir -p "$out"
    status=0
    for bench in "${names[@]}"; do
      # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
      PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH} "${BPT_CUDA_PYTHON:-python3}" "tools/bench/$bench.py" \
        --device cuda --out "$out/${bench}_cuda.json" ${BENCH_ARGS:-} 2>&1 | tee "$out/${bench}_cuda.log" || status=1
    done
    exit $status
    ;;
  *) usage ;;
esac
