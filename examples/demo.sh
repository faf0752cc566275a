#!/usr/bin/env bash
# `make demo`: the examples on a local cluster. With no BATON_MODELS set, builds tiny random
# models (no downloads) and maps the examples' model names to them.
set -euo pipefail
cd "$(dirname "$0")/.."
BATON="${BATON:-.venv/bin/baton}"
OUT="${OUT:-out}"
if [ -z "${BATON_MODELS:-}" ]; then
  TINY="${TINY_MODELS:-models/tiny}"
  for half in a b; do
    seed=$([ "$half" = a ] && echo 0 || echo 1)
    [ -d "$TINY/$half/flux" ] || "$BATON" dev tiny-models "$TINY/$half" --family sd1 --family sdxl --family flux \
      --seed "$seed" >/dev/null
  done
  export BATON_MODELS="sd1-a=$TINY/a/sd1,sd1-b=$TINY/b/sd1,sdxl-base=$TINY/a/sdxl,sdxl-second=$TINY/b/sdxl,\
flux-a=$TINY/a/flux,flux-b=$TINY/b/flux"
  echo "using tiny random models: $BATON_MODELS"
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
for spec in examples/sd1-two-model.yaml examples/sdxl-base-second.yaml examples/flux-two-model.yaml; do
  name=$(basename "$spec" .yaml)
  echo "== $spec -> $OUT/$name"
  "$BATON" run "$spec" --out "$OUT/$name"
done
