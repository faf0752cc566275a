#!/usr/bin/env bash
# `make demo`: the examples on a local cluster. With no BATON_MODELS set, builds tiny random
# models (no downloads) and maps the examples' model names to them.
set -euo pipefail
cd "$(dirname "$0")/.."
BATON="${BATON:-.venv/bin/baton}"
OUT="${OUT:-out}"
if [ -z "${BATON_MODELS:-}" ]; then
  # The same mapping `baton up` needs for these specs (README: "A local cluster").
  BATON_MODELS="$("$BATON" dev demo-models "${TINY_MODELS:-models/tiny}")"
  export BATON_MODELS
  echo "using tiny random models: $BATON_MODELS"
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
SPECS="examples/sd1-two-model.yaml examples/sdxl-base-second.yaml examples/flux-two-model.yaml"
if [ "${TINY_MODELS:-models/tiny}" = "models/tiny" ] && [ -f models/tiny/loras/sdxl-second-style.safetensors ]; then
  # The LoRA example names the random LoRA demo-models made; the denoiser may read it from there.
  export BATON_ADAPTER_SOURCES="${BATON_ADAPTER_SOURCES:-$(pwd)/models/tiny}"
  SPECS="$SPECS examples/sdxl-lora-second.yaml"
fi
for spec in $SPECS; do
  name=$(basename "$spec" .yaml)
  echo "== $spec -> $OUT/$name"
  "$BATON" run "$spec" --out "$OUT/$name"
done
