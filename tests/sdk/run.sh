#!/usr/bin/env bash
# SDK conformance: Smartcar's official Python and Node SDKs driving `carpulse simulator`.
#
#   bash tests/sdk/run.sh            (from anywhere; CI runs it from .ci/run after `cargo test`)
#
# Takes the carpulse binary from CARPULSE_BIN, else builds target/debug/carpulse (`cargo build`,
# a no-op when it is fresh). Installs the pinned SDKs into target/sdk/ (a venv and a node prefix,
# reused while the pinned version is there); the tests start their own simulators and talk to
# 127.0.0.1 only. Where a package registry cannot be reached, that suite prints "SKIPPED: …" and
# does not fail the run. Exits non-zero if any suite fails.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY_SDK_VERSION=6.19.1   # PyPI smartcar
NODE_SDK_VERSION=10.4.0 # npm smartcar
OUT=target/sdk
mkdir -p "$OUT"
started=$SECONDS

if [[ -z "${CARPULSE_BIN:-}" ]]; then
  # A no-op when target/debug/carpulse is fresh (as after `cargo test` in CI).
  echo "== cargo build"
  cargo build --quiet
  CARPULSE_BIN=target/debug/carpulse
fi
CARPULSE_BIN=$(realpath "$CARPULSE_BIN")
export CARPULSE_BIN
[[ -x "$CARPULSE_BIN" ]] || { echo "sdk: $CARPULSE_BIN is not an executable" >&2; exit 1; }

declare -a summary=()
failed=0

skip() { # suite, reason
  echo "SKIPPED: $1: $2"
  summary+=("$1: SKIPPED ($2)")
}

# --- Python SDK -------------------------------------------------------------------------------
python_suite() {
  local suite="Python SDK (PyPI smartcar==$PY_SDK_VERSION)"
  echo "== $suite"
  if ! command -v python3 >/dev/null; then
    skip "$suite" "python3 is not installed"
    return
  fi
  local venv="$OUT/venv" py
  local pip_opts=(--disable-pip-version-check --no-input -q --timeout 20 --retries 1)
  # A venv where python3 has venv support; else a plain --target directory on PYTHONPATH.
  if [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv" >/dev/null 2>&1; then
    py="$venv/bin/python"
  else
    rm -rf "$venv"
    py=python3
    export PYTHONPATH="$PWD/$OUT/pylib${PYTHONPATH:+:$PYTHONPATH}"
  fi
  local have
  have=$("$py" -c 'import smartcar; print(smartcar.__version__)' 2>/dev/null || true)
  if [[ "$have" != "$PY_SDK_VERSION" ]]; then
    local target=()
    [[ "$py" == python3 ]] && target=(--target "$OUT/pylib" --upgrade)
    if ! "$py" -m pip install "${pip_opts[@]}" "${target[@]}" "smartcar==$PY_SDK_VERSION"; then
      # Tell "the registry is out of reach" (skip) from "the install is broken" (fail).
      if ! "$py" -m pip download "${pip_opts[@]}" --no-deps -d "$OUT/pip-probe" \
          "smartcar==$PY_SDK_VERSION" >/dev/null 2>&1; then
        skip "$suite" "pip cannot reach its package index"
        return
      fi
      echo "sdk: pip install smartcar==$PY_SDK_VERSION failed" >&2
      summary+=("$suite: FAILED (install)")
      failed=1
      return
    fi
  fi
  local log="$OUT/python.log" rc=0
  "$py" -m unittest -v tests/sdk/python/test_sdk.py 2>&1 | tee "$log" || rc=$?
  local result
  result="$(grep -E '^Ran [0-9]+ tests' "$log" | tail -1), $(grep -E '^(OK|FAILED)' "$log" | tail -1)"
  if [[ $rc -eq 0 ]]; then
    summary+=("$suite: $result")
  else
    summary+=("$suite: FAILED: $result (log: $log)")
    failed=1
  fi
}

# --- Node SDK ---------------------------------------------------------------------------------
node_suite() {
  local suite="Node SDK (npm smartcar@$NODE_SDK_VERSION)"
  echo "== $suite"
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    skip "$suite" "node/npm is not installed"
    return
  fi
  local prefix="$OUT/node" have
  have=$(node -p "require('./$prefix/node_modules/smartcar/package.json').version" 2>/dev/null || true)
  if [[ "$have" != "$NODE_SDK_VERSION" ]]; then
    mkdir -p "$prefix"
    local npm_opts=(--no-audit --no-fund --fetch-timeout=20000 --fetch-retries=1 --prefix "$prefix")
    if ! npm install "${npm_opts[@]}" "smartcar@$NODE_SDK_VERSION"; then
      if ! npm view "${npm_opts[@]}" "smartcar@$NODE_SDK_VERSION" version >/dev/null 2>&1; then
        skip "$suite" "npm cannot reach its registry"
        return
      fi
      echo "sdk: npm install smartcar@$NODE_SDK_VERSION failed" >&2
      summary+=("$suite: FAILED (install)")
      failed=1
      return
    fi
  fi
  local log="$OUT/node.log" rc=0
  SMARTCAR_NODE_PREFIX="$PWD/$prefix" node --test --test-reporter=tap tests/sdk/node/sdk.test.mjs \
    2>&1 | tee "$log" || rc=$?
  local result
  result=$(grep -E '^# (tests|pass|fail|cancelled|skipped|todo) ' "$log" | sed 's/^# //' | paste -sd ' ' -)
  if [[ $rc -eq 0 ]]; then
    summary+=("$suite: $result")
  else
    summary+=("$suite: FAILED: $result (log: $log)")
    failed=1
  fi
}

python_suite
node_suite

echo "== SDK conformance against $CARPULSE_BIN ($((SECONDS - started)) s)"
for line in "${summary[@]}"; do
  echo "   $line"
done
exit "$failed"
