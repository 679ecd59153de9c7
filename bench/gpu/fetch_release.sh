#!/usr/bin/env bash
# Copies the KSA authors' HuggingFace inference code out of the release mirror into .ref/ksa-release/ (an
# ignored folder of the work tree, listed in .git/info/exclude, never committed), for bench/gpu/release_ref.py:
#   .ref/ksa-release/modeling_qwen3sa.py, summary_context.py, config.json   examples/pretrain/hf_template/
#   .ref/ksa-release/summary_attn/                                          the python package inside their wheel
#                                                                           summary_attention_kernel/summary_attn-*.whl
#   .ref/ksa-release/RELEASE_COMMIT                                         the mirror's commit
# summary_attn holds their prefill attention (summary_attn_func): the CuTe kernel when flash_attn.cute is
# importable on sm90+, and otherwise their FlexAttention path, which release_ref.py uses.
#   bench/gpu/fetch_release.sh [MIRROR]   (default /work/.mirror/Kuaishou-OneRec+KSA/repo)
set -euo pipefail
cd "$(dirname "$0")/../.."
MIRROR="${1:-/work/.mirror/Kuaishou-OneRec+KSA/repo}"
DEST=.ref/ksa-release
TEMPLATE=examples/pretrain/hf_template
git -C "$MIRROR" rev-parse --verify -q HEAD >/dev/null || { echo "fetch_release.sh: no git repository at $MIRROR" >&2; exit 1; }

if [ -d .git ] && ! grep -qx '/.ref/' .git/info/exclude 2>/dev/null; then
  mkdir -p .git/info && echo '/.ref/' >>.git/info/exclude
fi
rm -rf "$DEST" && mkdir -p "$DEST"
for f in modeling_qwen3sa.py summary_context.py config.json; do
  git -C "$MIRROR" show "HEAD:$TEMPLATE/$f" >"$DEST/$f"
done
WHL=$(git -C "$MIRROR" ls-tree --name-only HEAD summary_attention_kernel/ | grep -E '/summary_attn-.*\.whl$' | tail -1)
[ -n "$WHL" ] || { echo "fetch_release.sh: no summary_attn wheel under summary_attention_kernel/" >&2; exit 1; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
git -C "$MIRROR" show "HEAD:$WHL" >"$TMP/summary_attn.whl"
python3 - "$TMP/summary_attn.whl" "$DEST" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    names = [n for n in z.namelist() if n.startswith("summary_attn/") and n.endswith(".py")]
    z.extractall(sys.argv[2], members=names)
print("extracted", ", ".join(names))
EOF
echo "$(git -C "$MIRROR" rev-parse HEAD) $WHL" >"$DEST/RELEASE_COMMIT"
echo "release files in $DEST:"
find "$DEST" -type f | sort
