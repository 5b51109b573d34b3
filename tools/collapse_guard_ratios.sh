#!/usr/bin/env bash
# The quantize runs behind the collapse guard's default (README, Verification): each recipe's
# `verify:` line (quick perplexity on 4 held-out windows against the float model's), kept with
# --allow_degraded so that every ratio is printed. Usage: bash tools/collapse_guard_ratios.sh FLOAT_FOLDER [OUT]
set -u
m=${1:?float ORT-GenAI folder, e.g. runs/smollm2-fp32}
o=${2:-runs/guard/out}
q() { name=$1; shift; echo "== $name: $*"; python -m onnxquant.quantize --input_model_path "$m" --output_model_path "$o" --overwrite --use_moving_average --allow_degraded "$@" 2>&1 | grep -E "^verify|^quantized|^error"; }
q int8 --config INT8_TRANSFORMER_DEFAULT
q int8_symact --config INT8_SYMMETRIC_ACT
q w4_rtn_sym --config INT4_PER_GROUP_SYM
q int8_r1_sq_a0.8 --config INT8_TRANSFORMER_DEFAULT --include_rotation --include_sq --sq_alpha 0.8
q int8_sq_a0.8 --config INT8_TRANSFORMER_DEFAULT --include_sq --sq_alpha 0.8
q int8_sq_a0.9 --config INT8_TRANSFORMER_DEFAULT --include_sq --sq_alpha 0.9
q int8_r1_sq_a0.9 --config INT8_TRANSFORMER_DEFAULT --include_rotation --include_sq --sq_alpha 0.9
q int8_symact_pc_r1_sq --config INT8_SYMMETRIC_ACT_PER_CHANNEL --include_rotation --include_sq
q int8_r1_sq --config INT8_TRANSFORMER_DEFAULT --include_rotation --include_sq
q int8_pc_r1_sq --config INT8_PER_CHANNEL --include_rotation --include_sq
q w4_gptq --config UINT4_PER_GROUP_ASYM --algo gptq
echo "commit $(git rev-parse --short HEAD)"
