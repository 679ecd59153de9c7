#!/usr/bin/env bash
# The PyTorch package as a user gets it: a fresh virtual environment (--system-site-packages, for the
# installed torch), `pip install --no-build-isolation ./python` linking the kernel libraries of a CMake build,
# an import from outside the source tree, then pytest on python/tests.
#   scripts/test_python.sh [build dir [pytest args...]]   (default: build; ctest runs it as the test ksa_python)
# Environment: KSA_PYTHON (an interpreter with torch; default: the first of python3, /usr/bin/python3 that
# imports torch). Exits 77 (ctest: skipped) when no interpreter has torch or pytest.
set -euo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="$(cd "${1:-$SRC/build}" && pwd)"

PY=""
for c in ${KSA_PYTHON:-} python3 /usr/bin/python3; do
  if command -v "$c" >/dev/null 2>&1 && "$c" -c "import torch, pytest" >/dev/null 2>&1; then PY="$c"; break; fi
done
if [ -z "$PY" ]; then
  echo "SKIPPED: no python3 with torch and pytest (scripts/setup.sh installs Debian's python3-torch, python3-pytest)"
  exit 77
fi
echo "python: $PY ($("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)'))"

VENV="$BUILD/python-venv"
rm -rf "$VENV" "$BUILD/python-site"
start=$SECONDS
PIP_ARGS=(--no-build-isolation --no-index --no-cache-dir --disable-pip-version-check -q)
# --no-build-isolation: build against this environment's torch (no index is reachable or wanted);
# KSA_BUILD_DIR: link the libraries this build already made instead of configuring a second CMake build.
# (A venv made from an interpreter that is itself a venv does not see that venv's packages: check for torch.)
if "$PY" -m venv --system-site-packages "$VENV" >/dev/null 2>&1 && "$VENV/bin/python" -c "import torch, pytest" 2>/dev/null; then
  RUN=("$VENV/bin/python")
  KSA_BUILD_DIR="$BUILD" "${RUN[@]}" -m pip install "${PIP_ARGS[@]}" "$SRC/python" >"$BUILD/python-install.log" 2>&1 ||
    { tail -40 "$BUILD/python-install.log"; echo "pip install ./python: FAILED (log: $BUILD/python-install.log)"; exit 1; }
  echo "pip install ./python into a fresh venv: $((SECONDS - start)) s"
else
  # An interpreter without venv/ensurepip, or inside a venv itself (some GPU images): a target folder instead
  # (and no venv left behind, whose python would lack torch).
  rm -rf "$VENV"
  KSA_BUILD_DIR="$BUILD" "$PY" -m pip install "${PIP_ARGS[@]}" --no-deps --target "$BUILD/python-site" "$SRC/python" \
    >"$BUILD/python-install.log" 2>&1 ||
    { tail -40 "$BUILD/python-install.log"; echo "pip install ./python: FAILED (log: $BUILD/python-install.log)"; exit 1; }
  export PYTHONPATH="$BUILD/python-site${PYTHONPATH:+:$PYTHONPATH}"
  RUN=("$PY")
  echo "pip install --target (no usable venv from $PY): $((SECONDS - start)) s"
fi

cd "$BUILD"  # away from the source tree: the installed package, not python/ksa_torch, is imported
"${RUN[@]}" - <<'EOF'
import torch, ksa_torch
assert "/python/ksa_torch/" not in ksa_torch.__file__, ksa_torch.__file__  # the installed copy
k, S, T = 8, 1, 50
L = ksa_torch.stream_layout(T, k, S).max_seqlen
q = torch.randn(1, L, 2, 16, requires_grad=True)
ksa_torch.attention(q, q[:, :, :1].detach(), q[:, :, 1:].detach(), k, S, 2).sum().backward()
print(f"import ksa_torch {ksa_torch.__version__} from {ksa_torch.__file__}: ran forward and backward")
EOF

# The training recipe's tests (python/tests/test_train.py) run the `ksa` command of this build when it has one.
if [ -z "${KSA_BIN:-}" ] && [ -x "$BUILD/bin/ksa" ]; then export KSA_BIN="$BUILD/bin/ksa"; fi
rc=0
"${RUN[@]}" -m pytest -q -rs -p no:cacheprovider "$SRC/python/tests" "${@:2}" || rc=$?
if [ "$rc" -eq 5 ]; then echo "SKIPPED: pytest collected no test"; exit 77; fi
exit "$rc"
