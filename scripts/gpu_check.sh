#!/usr/bin/env bash
# The GPU check, in one call from the repository root, under 9 minutes:
#   1. every CUDA-path test (pytest -m cuda), each named with its result as it ends, each under a
#      per-test limit (pytest-timeout, PER_TEST_S, default 100 s), a failure with its full traceback;
#   2. a short GPU benchmark: tinyvit_5m encoder latency on CUDA (fp32 and bf16; batch 1 eager and
#      torch.compile, batch 8); distillation throughput at the paper's settings (vit_h teacher, tinyvit_5m
#      student, batch 8, 64 prompts, hard prompts; the teacher cache rate) and embedding-only; COCO AP and
#      everything mode on 2 images with the model on CUDA; a report of the records;
#   3. the rest of the test suite (with pytest-xdist where it is installed and there are >= 8 cores).
# Logs, JUnit XML, JSON records and report.md go under $OUT (default ./gpu_check_out); summary.txt
# there has one line per step. Each step has its own time limit, cut to what is left of the whole
# budget, so a hanging step cannot push the run past 9 minutes.
#
# `--device cpu` rehearses the same steps on a machine without a GPU in about 2 minutes: the CUDA tests
# skip with their reason, the benchmark steps run the same commands on the tiny registered models on
# the CPU, and the rest of the suite is only collected (CI runs it). Without a GPU and without
# `--device cpu`, the benchmark steps are reported as skipped, not failed.
# Exit status: 0 when no step failed or timed out. Use the Python environment of the project
# (PYTHON=... to pick another interpreter); COCO_ROOT=DIR to benchmark on a COCO folder (default: the
# shared 80-image COCO sample beside the checkout, else 16 generated images).
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
while (($#)); do
    case $1 in
    --device)
        DEVICE=${2:-}
        shift 2 || true
        ;;
    *)
        echo "usage: $0 [--device cuda|cpu]" >&2
        exit 2
        ;;
    esac
done
if [[ $DEVICE != cuda && $DEVICE != cpu ]]; then
    echo "error: --device must be cuda or cpu, got '$DEVICE'" >&2
    exit 2
fi

OUT="${OUT:-./gpu_check_out}"
PYTHON="${PYTHON:-python}"
BUDGET_S="${BUDGET_S:-540}" # of the 9 minutes: leaves time to start Python and write the summary
START=$(date +%s)
FAILED=0
mkdir -p "$OUT/logs" "$OUT/records" || { echo "error: cannot create $OUT" >&2; exit 1; }
: >"$OUT/summary.txt"

note() { echo "$*" | tee -a "$OUT/summary.txt"; }

# step NAME LIMIT_S COMMAND...: run COMMAND with at most LIMIT_S seconds (and never past the budget),
# its output in logs/NAME.log; one summary line with status and seconds.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - ($(date +%s) - START)))
    ((limit > left)) && limit=$left
    if ((limit < 5)); then
        note "$name: not run (the ${BUDGET_S} s budget is spent)"
        FAILED=1
        return
    fi
    local began=$(date +%s) rc
    timeout --kill-after=10 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
    rc=$?
    local took=$(($(date +%s) - began)) status=passed
    if ((rc == 124 || rc == 137)); then
        status="TIMED OUT after ${limit} s"
        FAILED=1
    elif ((rc != 0)); then
        status="FAILED (exit $rc)"
        FAILED=1
    fi
    note "$name: $status in ${took} s ($(tail -n 1 "$OUT/logs/$name.log"))"
}

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    git rev-parse --short HEAD 2>/dev/null
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())'
    nproc
} >"$OUT/environment.txt" 2>&1

# -v names each test as it ends, so a log cut by the step limit still says which failed; --tb=long keeps a
# failure's whole assertion output; the per-test limit keeps one test from taking the whole step.
per_test=(--timeout "${PER_TEST_S:-100}")
step tests-cuda 200 "$PYTHON" -m pytest -v --tb=long "${per_test[@]}" -m cuda --junitxml="$OUT/junit-cuda.xml" tests

if [[ $DEVICE == cuda ]] && ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    note "benchmark: skipped, PyTorch sees no CUDA GPU here (--device cpu rehearses it on the CPU)"
else
    bench=("$PYTHON" -m benchmarks)
    if [[ $DEVICE == cuda ]]; then
        model=(--model tinyvit_5m --device cuda) # random weights: the timings hold, the AP does not
        compile=(--compile)
        repeats=(--warmup 3 --repeats 20)
        batch=8
        grid=()
        # TinySAM's recipe (what --data selects) at batch 8 with 8 loader workers.
        paper=(--teacher vit_h --student tinyvit_5m --batch-size 8 --num-workers 8 --skip 2 --measure 5)
    else # the same commands at a size the CPU runs in seconds
        model=(--model tinyvit_test --device cpu)
        compile=()
        repeats=(--warmup 1 --repeats 2 --threads 2)
        batch=2
        grid=(--points-per-side 8)
        paper=(--teacher sam_vit_test --student tinyvit_test --batch-size 1 --num-workers 0 --skip 1 --measure 1
            --max-images 2 --prompts-per-image 4 --max-prompt-iters 1)
    fi
    # Batch 1 eager and torch.compile (CUDA graphs) in one run.
    step latency-encoder-batch1-compile 90 "${bench[@]}" latency "${model[@]}" --components encoder \
        --image-batch 1 "${compile[@]}" "${repeats[@]}" --out "$OUT/records"
    coco_root="${COCO_ROOT:-../shared/data/coco_val2017_tiny}"
    if [[ ! -f "$coco_root/annotations/instances_val2017.json" ]]; then
        coco_root="$OUT/synthetic_coco"
        step synthetic-coco 30 "$PYTHON" -c \
            "import sys; from benchmarks.synthetic_coco import write_synthetic_coco; write_synthetic_coco(sys.argv[1], num_images=16)" \
            "$coco_root"
    fi
    # The first run fills the teacher cache (its rate is in the record); the embedding-only run reuses it.
    paper+=(--data "$coco_root" --device "$DEVICE" --cache-dir "$OUT/teacher_cache" --out "$OUT/records")
    step distill-paper-full 150 "${bench[@]}" distill "${paper[@]}"
    step distill-paper-embedding-only 60 "${bench[@]}" distill "${paper[@]}" --no-token-loss --no-output-loss
    rm -rf "$OUT/teacher_cache" # hundreds of MB of embeddings: not part of the results
    step everything-2-images 75 "${bench[@]}" everything "${model[@]}" --coco-root "$coco_root" \
        --max-images 2 "${grid[@]}" --out "$OUT/records"
    step coco-2-images 60 "${bench[@]}" coco "${model[@]}" --coco-root "$coco_root" --max-images 2 \
        --chunk-size 64 --out "$OUT/records"
    step "latency-encoder-batch$batch" 45 "${bench[@]}" latency "${model[@]}" --components encoder \
        --image-batch "$batch" "${repeats[@]}" --out "$OUT/records"
    step report 30 "${bench[@]}" report --records "$OUT/records" --out "$OUT/report"
fi

# The rest of the suite last: it is the longest step, and the budget cuts it rather than the figures above.
parallel=()
if (($(nproc) >= 8)) && "$PYTHON" -c 'import xdist' 2>/dev/null; then
    parallel=(-n 8) # 8 workers x 2 threads each
    export OMP_NUM_THREADS=2
fi
if [[ $DEVICE == cuda ]]; then
    step tests-all 300 "$PYTHON" -m pytest -q "${parallel[@]}" "${per_test[@]}" -m "not cuda" -rfE --durations=10 \
        --junitxml="$OUT/junit-all.xml" tests
else
    step tests-all-collected 60 "$PYTHON" -m pytest -q --collect-only -m "not cuda" tests
fi

note "total: $(($(date +%s) - START)) s; $([[ $FAILED == 0 ]] && echo "all steps passed" || echo "SOME STEPS FAILED")"
note "logs, records and report under $OUT"
exit "$FAILED"
