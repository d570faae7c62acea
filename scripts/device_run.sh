#!/usr/bin/env bash
# Everything that needs a GPU, in one call on a GPU machine: the GPU tests, the
# end-to-end suite with the worker on CUDA, and the benchmark. Results go to $OUT.
#
#   scripts/device_run.sh [gpu|tests|sweep|kernels|bench|all] [extra bench args...]
#   scripts/device_run.sh [bench-start|bench-wait] [extra bench args...]
#   scripts/device_run.sh host-profile [bench args...]
#   scripts/device_run.sh ab 'SWEEP ARGS A' 'SWEEP ARGS B' [common sweep args...]
#   (gpu: only the tests marked gpu; tests: those and the e2e suite on CUDA; sweep: the
#   gpu tests and the decode/prefill sweep alone; kernels: the gpu tests and the component
#   benchmarks, bench.gemm and bench.attention, with their searches; bench: `python -m
#   bench`, sweep included. bench-start runs the same benchmark in its own session, so that
#   it outlives a command that has a time limit, and waits for it up to $WAIT_S seconds
#   (default 540); bench-wait waits again. Whichever sees it finish copies bench.json,
#   bench.png and bench.txt to $OUT.)
#   host-profile: `python -m bench --no-sweep --no-trace [bench args...]` with py-spy
#   (a wheel in .whl/) sampling the engine and the worker for $SPY_S seconds (default 10),
#   $SPY_AFTER_S (default 8) after the bench says it is measuring: give it a run that
#   lasts longer than that, e.g. --model random:smollm2-135m --modes tandem-async
#   --new-tokens 16384. Writes spy-*.txt (raw samples) and spy.txt (python -m bench.spy).
#   ab: the gpu tests, then the decode sweep four times, A B A B (drift in the card's state
#   falls on both), e.g. ab '--fold-norms off' '--fold-norms on' --batches 1,32,128
#   --contexts 1024,4096 --prefill-rows 1 --prefill-tokens 64; python -m bench.compare
#   prints them side by side (ab.txt).
#
# Missing Python packages travel as wheels in .whl/ and the tokenizer cache in
# .device/cache/ (see README, "Running on a GPU machine").
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
shift || true
OUT=${OUT:-bench_results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -d .device/cache ] && export TANDEM_CACHE="$PWD/.device/cache"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv \
    | tee "$OUT/gpu.txt"
status=0
if [ "$what" = gpu ] || [ "$what" = tests ] || [ "$what" = sweep ] || [ "$what" = kernels ] ||
        [ "$what" = ab ] || [ "$what" = all ]; then
    python3 -m pytest -q -rfs -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/gpu_tests.txt"
    status=$(( status | PIPESTATUS[0] ))
fi
if [ "$what" = sweep ]; then
    python3 -m bench.sweep "$@" > "$OUT/sweep.json" 2> "$OUT/sweep.log"
    status=$(( status | $? ))
    tail -n 40 "$OUT/sweep.log"
fi
if [ "$what" = ab ]; then
    variant_a=$1 variant_b=$2
    shift 2
    for run in a1 b1 a2 b2; do
        case $run in a*) extra=$variant_a ;; *) extra=$variant_b ;; esac
        # shellcheck disable=SC2086  # each variant's arguments split on purpose
        python3 -m bench.sweep $extra "$@" > "$OUT/sweep-$run.json" 2> "/tmp/sweep-$run.log"
        status=$(( status | $? ))
        grep "decode batch" "/tmp/sweep-$run.log" | sed "s/^/$run /"
    done
    python3 -m bench.compare "A=$OUT/sweep-a1.json,$OUT/sweep-a2.json" \
        "B=$OUT/sweep-b1.json,$OUT/sweep-b2.json" > "$OUT/ab.txt"
    echo "A: $variant_a; B: $variant_b" >> "$OUT/ab.txt"
    grep -v '^{' "$OUT/ab.txt"
fi
if [ "$what" = kernels ]; then
    python3 -m bench.gemm --search 32 > "$OUT/gemm.json" 2> "$OUT/gemm.log"
    status=$(( status | $? ))
    python3 -m bench.attention --search > "$OUT/attention.json" 2> "$OUT/attention.log"
    status=$(( status | $? ))
    grep -hE "rows|batch" "$OUT/gemm.log" "$OUT/attention.log"
fi
if [ "$what" = tests ] || [ "$what" = all ]; then
    TANDEM_TEST_MODEL=random:smollm2-135m TANDEM_TEST_DEVICE=cuda \
        python3 -m pytest -q -rfs -p no:cacheprovider tests/e2e 2>&1 | tee "$OUT/e2e_cuda.txt"
    status=$(( status | PIPESTATUS[0] ))
fi
BG=/tmp/tandem-bench
if [ "$what" = bench-start ]; then
    mkdir -p "$BG"
    setsid nohup python3 -m bench --out "$BG" "$@" > "$BG/bench.txt" 2>&1 < /dev/null &
    echo $! > "$BG/pid"
fi
if [ "$what" = bench-start ] || [ "$what" = bench-wait ]; then
    pid=$(cat "$BG/pid" 2>/dev/null) || { echo "no background bench to wait for"; exit 1; }
    waited=0
    while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt "${WAIT_S:-540}" ]; do
        sleep 5
        waited=$((waited + 5))
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "bench still running after ${waited} s: call bench-wait again"
        tail -n 5 "$BG/bench.txt"
    else
        cp "$BG/bench.txt" "$OUT/"
        cp "$BG/bench.json" "$BG/bench.png" "$OUT/" 2>/dev/null
        grep -v '^20' "$BG/bench.txt" | tail -n 40
    fi
fi
if [ "$what" = host-profile ]; then
    # few files come back from a GPU machine: the bench's own folder stays there
    python3 -m bench --out /tmp/tandem-profile --no-sweep --no-trace --no-hf-trace "$@" \
        > "$OUT/bench.txt" 2>&1 &
    bench_pid=$!
    waited=0
    until grep -q "measuring" "$OUT/bench.txt" 2>/dev/null || [ "$waited" -ge 300 ]; do
        sleep 1
        waited=$((waited + 1))
    done
    sleep "${SPY_AFTER_S:-8}"
    for name in tokenizer_svc gpu_worker; do
        pid=$(pgrep -f -- "-m $name" | head -n 1)
        if [ -n "$pid" ]; then
            /tmp/site/bin/py-spy record --pid "$pid" --duration "${SPY_S:-10}" --rate 250 \
                --nonblocking --threads --format raw --output "$OUT/spy-$name.txt" \
                > "/tmp/spy-$name.log" 2>&1 &
        else
            echo "no $name process to sample"
        fi
    done
    wait "$bench_pid"
    status=$(( status | $? ))
    wait
    cp /tmp/tandem-profile/bench.json "$OUT/" 2>/dev/null
    cat /tmp/spy-*.log >> "$OUT/bench.txt"
    python3 -m bench.spy --top 25 "$OUT"/spy-*.txt > "$OUT/spy.txt"
    grep -v '^20' "$OUT/bench.txt" | tail -n 20
    grep -E "^(==|--)" "$OUT/spy.txt"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
    python3 -m bench --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.txt"
    status=$(( status | PIPESTATUS[0] ))
fi
exit $status
