#!/usr/bin/env bash
# What a session with a GPU checks and measures, in one device call (under 10 minutes on an H100; a
# session is lent 15 minutes of device time, start-up included, so there may be no second call).
# Most needed first, so that whatever the budget cuts is the least needed: the targets (ours captured
# against JAX and learn2learn at 1 and 5 inner steps, measured in one run), the GPU-only tests, the
# end-to-end tasks/s and 600-task evaluation, then the candidates for the JAX target (ours captured
# with PyTorch's BatchNorm derivatives, pool before norm, channels-last weights, the first convolution
# unfolded, grouped convolution derivatives) and last the kernels of a meta-iteration by default, with
# grouped convolution derivatives and with PyTorch's BatchNorm derivatives. Everything is written
# under OUTPUT; a short table is printed last.
#
#   source .gpu/setup.sh > /tmp/setup.log 2>&1; bash benchmarks/gpu_session.sh $OUT
#
# --full adds ours eager, iMAML and fp32 rows. --compile, a call of its own (Inductor compiles for
# minutes): torch.compile's fused MAML, eager and replayed as CUDA graphs, against our captured row and JAX.
set -u
out=${1:?usage: benchmarks/gpu_session.sh OUTPUT_FOLDER [--full | --compile]}
full=${2:-}
mkdir -p "$out"
# The device call stops at 10 minutes, .gpu/setup.sh's ~40 s included: each step gets what is left of
# this script's budget (at most its own limit), and one that would get under 30 s is skipped, so the
# summary below is always printed.
budget=${GPU_SESSION_SECONDS:-530}
within() {  # within LIMIT LOG COMMAND...: COMMAND's output to LOG, stopped after LIMIT or at the budget
    local limit=$1 log=$2 left=$((budget - SECONDS))
    shift 2
    if [ "$left" -lt 30 ]; then
        echo "skipped: the session's ${budget} s ran out before: $*" > "$log"
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    timeout "$limit" "$@" > "$log" 2>&1
    [ $? -eq 124 ] && echo "error: stopped after ${limit} s (its limit or the session's budget)" >> "$log"
}
data=${BILEVEL_MAML_DATA:?source .gpu/setup.sh first: it exports BILEVEL_MAML_DATA}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/device.txt" 2>&1
python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda)' >> "$out/device.txt" 2>&1

if [ "$full" = "--compile" ]; then
    within 540 "$out/meta_iteration-compile.txt" python3 benchmarks/meta_iteration.py --device cuda \
        --data-root "$data" --sections meta-iteration --queries 1 --steps 1 5 --repeats 7 \
        --implementations "ours maml vectorized (cuda graph)" "torch.compile maml (cuda graph)" "torch.compile maml" \
        "jax maml (jit + vmap)" --json "$out/meta_iteration-compile.json"
    echo "== $(head -1 "$out/device.txt")"
    grep -E "^  steps|JAX's time|Error|error:|skipped:" "$out/meta_iteration-compile.txt" | cut -c1-150
    exit 0
fi

# the targets first, in one run: ours captured against JAX and learn2learn
within 200 "$out/meta_iteration-tf32.txt" python3 benchmarks/meta_iteration.py --device cuda --data-root "$data" \
    --sections meta-iteration --queries 1 --steps 1 5 --repeats 7 --memory-steps --implementations \
    "ours maml vectorized (cuda graph)" "jax maml (jit + vmap)" "learn2learn maml" --json "$out/meta_iteration-tf32.json"

# every GPU-only test is named test_on_a_gpu_*; only their files are collected (the GPU machine has no wandb,
# which some other test files import)
gpu_test_files=$(grep -l "def test_on_a_gpu" tests/test_*.py)
within 200 "$out/gpu-tests.txt" python3 -m pytest -q -p no:cacheprovider -rfs -k on_a_gpu $gpu_test_files

within 150 "$out/end_to_end.txt" python3 benchmarks/meta_iteration.py --device cuda --data-root "$data" \
    --sections end-to-end evaluation sampling replay-check --json "$out/end_to_end.json"

candidates=("ours maml vectorized pool before norm (cuda graph)" "ours maml vectorized channels last (cuda graph)"
            "ours maml vectorized unfolded first conv (cuda graph)" "ours maml vectorized grouped conv grads (cuda graph)"
            "ours maml vectorized pytorch norm grads (cuda graph)" "ours maml vectorized (cuda graph)")
if [ "$full" = "--full" ]; then
    candidates+=("ours maml vectorized" "ours imaml vectorized (cuda graph)"
                 "ours imaml vectorized grouped conv grads (cuda graph)")
fi
within 300 "$out/meta_iteration-tf32-candidates.txt" python3 benchmarks/meta_iteration.py --device cuda \
    --data-root "$data" --sections meta-iteration --queries 1 --steps 1 5 --repeats 7 --memory-steps \
    --implementations "${candidates[@]}" --json "$out/meta_iteration-tf32-candidates.json"
if [ "$full" = "--full" ]; then
    within 300 "$out/meta_iteration-fp32.txt" python3 benchmarks/meta_iteration.py --device cuda --data-root "$data" \
        --precision fp32 --sections meta-iteration --queries 1 --steps 1 5 --repeats 7 --memory-steps \
        --implementations "ours maml vectorized (cuda graph)" "jax maml (jit + vmap)" --json "$out/meta_iteration-fp32.json"
fi
# last, where the kernels go: a diagnosis (the rows above are the README's table)
for variant in "" --grouped-conv-grads --pytorch-norm-grads; do
    within 120 "$out/gpu_kernels${variant}.txt" python3 benchmarks/gpu_kernels.py --data-root "$data" --steps 1 5 \
        --repeats 20 $variant
done

echo "== $(head -1 "$out/device.txt")"
echo "== GPU tests: $(tail -1 "$out/gpu-tests.txt")"
grep -E "^(FAILED|ERROR)" "$out/gpu-tests.txt" | cut -c1-200
for f in "$out"/meta_iteration-*.txt; do
    echo "== ${f##*/}"
    grep -E "^  steps|JAX's time|learn2learn maml,|Error|error:|skipped:" "$f" | cut -c1-150
done
for f in "$out"/gpu_kernels*.txt; do
    echo "== ${f##*/}"
    grep -E "launches|^ +[0-9]+ +[0-9.]+ ms|Error|error:|skipped:" "$f" | cut -c1-150
done
[ -f "$out/end_to_end.txt" ] && { echo "== end to end"; grep -E "tasks/s|s for|ms" "$out/end_to_end.txt" | tail -20; }
exit 0
