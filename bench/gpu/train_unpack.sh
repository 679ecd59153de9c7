#!/usr/bin/env bash
# Puts the outputs of bench/gpu/train.sh back together: DIR holds train.tar.gz and <attn>.safetensors (what
# came back from the device's $OUT); DEST/train/<attn>/model/ becomes a complete checkpoint directory.
#   bench/gpu/train_unpack.sh DIR DEST
set -euo pipefail
DIR="$1" DEST="$2"
mkdir -p "$DEST"
tar -xzf "$DIR/train.tar.gz" -C "$DEST"
for st in "$DIR"/*.safetensors; do
  attn=$(basename "$st" .safetensors)
  mkdir -p "$DEST/train/$attn/model"
  cp "$st" "$DEST/train/$attn/model/model.safetensors"
  echo "$DEST/train/$attn/model: $(ls "$DEST/train/$attn/model" | tr '\n' ' ')"
done
