#!/usr/bin/env bash
# The GPU checks of issue 5, each step with its own time limit, results under OUT:
#   graph-tests  python -m pytest -m gpu -k "cuda_graphs and not compiled_adapters" on the files that hold them:
#                CUDA graphs against eager training and inference, the training engine and `medtuning predict`
#                with graphs (the compiled adapters' test belongs to the compile step)       (limit 150 s)
#   cost         bash benchmarks/gpu_cost.sh: the paper-setting benchmark with every default method, CUDA
#                graphs included; OUT/cost_paper_cuda.json and OUT/cost_paper_cuda.md (the cost.md section)
#                                                                                           (limit 330 s)
#   tests        python -m pytest -m gpu -k "not cuda_graphs": the other CUDA tests (fast form against the
#                reference in float32 and bf16, checkpointed gradients, prediction CPU vs CUDA)
#                                                                                           (limit 240 s)
#   kernels      python benchmarks/adapter_kernels.py: one adapter per paper block shape, each form
#                (OUT/adapter_kernels_cuda.json)                                            (limit 90 s)
#   compile      the adapters compiled (inductor) and replayed as CUDA graphs, only once the graph tests passed:
#                first their test (tests/test_compiled_adapter_graphs.py, limit 120 s), then, if it passed,
#                gpu_cost.sh on ViT-B/16 then Swin-T with full, med_adapter+cuda_graphs
#                and med_adapter+compile_adapters+cuda_graphs (not the compiled adapters without graphs: their
#                compilations would double the step, and without graphs they stay launch-bound)
#                (OUT/cost_paper-compile_cuda.json and .md)                                 (limit 320 s)
#   fusion       python benchmarks/adapter_kernels.py on ViT-B/16's and Swin-T stage 1's adapter: eager, as CUDA graphs
#                (if their tests passed), and compiled with the depthwise convolutions as shifted sums and as
#                convolutions: GPU busy time and kernels of one adapter per form, the compile time, and what
#                inductor generated (OUT/adapter_kernels_compiled_cuda.json)                 (limit 200 s)
#   fpn          gpu_cost.sh --decoder fpn: the comparison with the package's light FPN decoder (128 channels) in
#                place of UperNet 512, whose activations dominate every method's memory; the default methods
#                less med_adapter_reference (graphs only if their tests passed)
#                (OUT/cost_paper-fpn128_cuda.json and .md)                                  (limit 300 s)
#   optimizer    python benchmarks/optimizer_step.py: the training engine's Adam step per implementation (per-tensor
#                loop, foreach, fused) over the paper models' trainable parameters
#                (OUT/optimizer_step_cuda.json and .md)                                     (limit 60 s)
# Usage: bash benchmarks/gpu_session.sh OUT [STEP ...]
#   With no STEP: graph-tests, cost and kernels (at most 570 s; 356 s on an H200 when the graph tests failed
#   and the cost step ran without graphs). Where the standard figures are already committed, the fusion check is
#   bash benchmarks/gpu_session.sh OUT graph-tests compile (own limits 590 s, kept to the 570 s budget; compile
#   times untested on a GPU, so ViT-B/16 is measured first and written on its own).
#   The light-decoder comparison: bash benchmarks/gpu_session.sh OUT graph-tests fpn (at most 450 s).
# The limits above are each step's own; the command as a whole keeps to SESSION_BUDGET_S (default 570 s): a step's
# limit is cut to what is left of it, and a step with under 15 s left is not started (exit 124). So
# `graph-tests fusion compile` and `graph-tests cost fpn`, whose own limits add up to more, end by themselves
# inside the device's 600 s per command, with what the last step finished in time written (the cost steps write
# their JSON after each backbone). SESSION_BUDGET_S counts from this script's start: give it the command's time
# limit less what runs before the script (installing the carried wheels: about 20 s) and a margin, e.g. 540 for
# a 600 s limit; when the device has less time left than 600 s, size it from that.
# CUDA_GRAPHS_TESTED=1: the graph tests passed in an earlier command on this same machine (OUT starts empty at each
# command, so their exit file is gone): the steps measure CUDA graphs without running them again.
# A failing step does not stop the others; the exit status is that of the last failing step (0 if none).
# The steps that measure CUDA graphs leave them out (cost, kernels) or skip (compile) when the graph tests did not
# pass in the same OUT (a failed capture can leave the CUDA context unusable, and must not cost the other
# figures), or with SKIP_CUDA_GRAPHS=1.
# Every step's output goes to OUT/session.log (the device returns at most 8 files: the log, the two exit
# files and the five result files fit). Copy the results into the repository afterwards: OUT/cost_paper_cuda.json
# to benchmarks/results/, and the section of OUT/cost_paper_cuda.md into benchmarks/cost.md (gpu_cost.sh run
# from a checkout without --json and --markdown writes both in place); the same for the compile files.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: bash benchmarks/gpu_session.sh OUT [graph-tests] [cost] [tests] [kernels] [compile] [fusion] [fpn] [optimizer]}"
shift
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(graph-tests cost kernels)
for step in "${STEPS[@]}"; do
    case "$step" in
        graph-tests | cost | tests | kernels | compile | fusion | fpn | optimizer) ;;
        *) echo "gpu_session.sh: unknown step '$step' (graph-tests, cost, tests, kernels, compile, fusion, fpn," \
            "optimizer)" >&2
            exit 2 ;;
    esac
done
# The whole command's time (SESSION_BUDGET_S, default 570 s): every step's limit is cut to what is left of it, so
# that the command ends by itself, log, exit files and results written, inside the device's 600 s per command.
BUDGET="${SESSION_BUDGET_S:-570}"
if ! [[ "$BUDGET" =~ ^[0-9]+$ ]]; then
    echo "gpu_session.sh: SESSION_BUDGET_S must be a number of seconds, got '$BUDGET'" >&2
    exit 2
fi
mkdir -p "$OUT"
# Everything below, to the terminal and to one log.
exec > >(tee -a "$OUT/session.log") 2>&1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
# run_limited LIMIT COMMAND...: COMMAND under timeout for LIMIT seconds, or what is left of the budget if less
# (killed 10 s after the TERM signal if still running); not started (exit 124) with under 15 s left.
run_limited() {
    local limit=$1 left=$((BUDGET - SECONDS))
    shift
    if [ "$left" -lt 15 ]; then
        echo "not started: $left s left of the session's $BUDGET s (SESSION_BUDGET_S)"
        return 124
    fi
    if [ "$left" -lt "$limit" ]; then
        limit=$left
        echo "time limit cut to $limit s: what is left of the session's $BUDGET s (SESSION_BUDGET_S)"
    fi
    timeout -k 10 "$limit" "$@"
}
# Whether CUDA graphs may be measured: their tests passed in this OUT (or, with CUDA_GRAPHS_TESTED=1, in an earlier
# command on this machine), and SKIP_CUDA_GRAPHS is not 1.
graphs_passed() {
    local graph_tests="missing"
    [ "${CUDA_GRAPHS_TESTED:-0}" = 1 ] && graph_tests=0
    [ -f "$OUT/graph_tests.exit" ] && graph_tests="$(cat "$OUT/graph_tests.exit")"
    if [ "${SKIP_CUDA_GRAPHS:-0}" = 1 ] || [ "$graph_tests" != 0 ]; then
        echo "CUDA graphs are left out of this step (graph tests: exit $graph_tests;" \
            "SKIP_CUDA_GRAPHS=${SKIP_CUDA_GRAPHS:-0})"
        return 1
    fi
}
status=0
for step in "${STEPS[@]}"; do
    echo "== $step ($(date -u +%H:%M:%S))"
    case "$step" in
        graph-tests)
            # A process of its own: a failed capture can leave the CUDA context unusable.
            # The files that hold them (a module of unrelated tests that fails to import cannot stop these), without
            # the compiled adapters' test: a cold inductor compile, the compile step's own test.
            run_limited 150 "$PYTHON" -m pytest -m gpu -k "cuda_graphs and not compiled_adapters" -q \
                -p no:cacheprovider tests/test_med_adapter_cuda_graphs.py tests/test_cli.py tests/test_training.py
            code=$?
            echo "$code" >"$OUT/graph_tests.exit"
            ;;
        cost)
            methods=()
            if ! graphs_passed; then
                # The default methods less the CUDA-only ones: step_time.py's own list, as on a CPU.
                read -ra methods <<<"--methods $("$PYTHON" -c 'import sys; sys.path.insert(0, "benchmarks")
import step_time, torch; print(*step_time.default_methods(torch.device("cpu")))')"
            fi
            run_limited 330 bash benchmarks/gpu_cost.sh ${methods[@]+"${methods[@]}"} \
                --json "$OUT/cost_paper_cuda.json" --markdown "$OUT/cost_paper_cuda.md"
            code=$?
            ;;
        tests)
            run_limited 240 "$PYTHON" -m pytest -m gpu -k "not cuda_graphs" -q -p no:cacheprovider
            code=$?
            ;;
        kernels)
            forms=()
            if ! graphs_passed; then  # adapter_kernels.py's forms less cuda_graphs
                read -ra forms <<<"--forms $("$PYTHON" -c 'import sys; sys.path.insert(0, "benchmarks")
import adapter_kernels as k; print(*[f for f in k.FORMS if f != "cuda_graphs"])')"
            fi
            run_limited 90 "$PYTHON" benchmarks/adapter_kernels.py --device cuda ${forms[@]+"${forms[@]}"} \
                --json "$OUT/adapter_kernels_cuda.json"
            code=$?
            ;;
        compile)
            if ! graphs_passed; then
                code=3  # graphs are what this step measures: its test and measurement would be wasted
            else
                run_limited 120 "$PYTHON" -m pytest -m gpu tests/test_compiled_adapter_graphs.py -q -p no:cacheprovider
                code=$?
                echo "$code" >"$OUT/compile_tests.exit"
                if [ "$code" -ne 0 ]; then
                    echo "compiled adapters with CUDA graphs failed their test (exit $code): not measured"
                else
                    # ViT-B/16 first: one adapter shape, the fewest compilations; the JSON is written after each
                    # backbone.
                    run_limited 320 bash benchmarks/gpu_cost.sh --backbones vit-b16 swin-t --methods full \
                        med_adapter+cuda_graphs med_adapter+compile_adapters+cuda_graphs \
                        --json "$OUT/cost_paper-compile_cuda.json" --markdown "$OUT/cost_paper-compile_cuda.md"
                    code=$?
                fi
            fi
            ;;
        fusion)
            forms=(current compiled_shifts compiled_convolution)
            graphs_passed && forms+=(cuda_graphs)
            run_limited 200 "$PYTHON" benchmarks/adapter_kernels.py --device cuda \
                --blocks vit-b16 "swin-t stage 1" --forms "${forms[@]}" --json "$OUT/adapter_kernels_compiled_cuda.json"
            code=$?
            ;;
        fpn)
            # step_time.py's default methods on CUDA (or, without passed graph tests, on a CPU), less the
            # reference form: its launch-bound steps would take a third of the time limit.
            device=cuda
            graphs_passed || device=cpu
            read -ra methods <<<"--methods $("$PYTHON" -c 'import sys; sys.path.insert(0, "benchmarks")
import step_time, torch
print(*[m for m in step_time.default_methods(torch.device(sys.argv[1])) if m != "med_adapter_reference"])' "$device")"
            run_limited 300 bash benchmarks/gpu_cost.sh --decoder fpn "${methods[@]}" \
                --json "$OUT/cost_paper-fpn128_cuda.json" --markdown "$OUT/cost_paper-fpn128_cuda.md"
            code=$?
            ;;
        optimizer)
            run_limited 60 "$PYTHON" benchmarks/optimizer_step.py --device cuda \
                --json "$OUT/optimizer_step_cuda.json" --markdown "$OUT/optimizer_step_cuda.md"
            code=$?
            ;;
    esac
    [ "$code" -ne 0 ] && { echo "== $step failed (exit $code)" >&2; status=$code; }
done
echo "== done ($(date -u +%H:%M:%S)), exit $status"
exit $status
