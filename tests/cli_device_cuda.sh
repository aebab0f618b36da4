#!/bin/sh
# `cacheshrink eval / convert / generate --device cuda` against the same commands on the CPU (ctest
# cli_eval_convert_device_cuda). Without a GPU or a CUDA build the first GPU run fails with an
# error naming --device cuda: the script prints it and exits 0, and the test's regex accepts it.
#   cli_device_cuda.sh CLI FIXTURES_DIR
cli=$1
model=$2/models/tiny-llama3
last() { sed -n "$1" | tail -1; }
check() {  # check WHAT GPU CPU LIMIT: prints the comparison; fails beyond LIMIT (relative)
  awk -v w="$1" -v g="$2" -v c="$3" -v l="$4" 'BEGIN { if (g == "" || c == "") { printf "%s: no perplexity (gpu \"%s\", cpu \"%s\")\n", w, g, c; exit 1 }
    r = (g - c) / c; if (r < 0) r = -r
    printf "%s: gpu %s cpu %s rel %.2e %s\n", w, g, c, r, (r <= l ? "ok" : "MISMATCH"); exit !(r <= l) }'
}
out=$("$cli" eval --model "$model" --device cuda --windows 64 2>&1) || { echo "$out" | tail -1; exit 0; }
g=$(echo "$out" | last 's/^perplexity: //p')
c=$("$cli" eval --model "$model" --windows 64 2>/dev/null | last 's/^perplexity: //p')
check "eval f32" "$g" "$c" 1e-5 || exit 1
g=$("$cli" eval --model "$model" --device cuda --precision bf16 --windows 64 2>/dev/null | last 's/^perplexity: //p')
check "eval bf16" "$g" "$c" 1e-3 || exit 1
args="convert --model $model --ratio 2 --calibration-samples 8 --eval --eval-windows 16"
g=$("$cli" $args --device cuda 2>/dev/null | last 's/.*-> MLA \([0-9.]*\).*/\1/p')
c=$("$cli" $args 2>/dev/null | last 's/.*-> MLA \([0-9.]*\).*/\1/p')
check "convert f32" "$g" "$c" 1e-4 || exit 1
gen="generate --model $model --prompt-ids 1489,1489,1489,3526,303,86,2610,1489 --max-new-tokens 16"
g=$("$cli" $gen --device cuda 2>/dev/null | last 's/^generated ids: //p')
c=$("$cli" $gen 2>/dev/null | last 's/^generated ids: //p')
if [ -n "$g" ] && [ "$g" = "$c" ]; then echo "generate f32: gpu = cpu ok"; else echo "generate f32: MISMATCH gpu '$g' cpu '$c'"; exit 1; fi
