#!/usr/bin/env bash
# The one prepared script for a session that is lent a GPU (the `device` tool): GPU correctness,
# then the CUDA benchmarks, inside one call of at most 10 minutes. Results come back under $OUT.
#
# Here, first:   bash benchmarks/gpu/fetch_wheels.sh
# Then:          run(command="CURVOP_COMMIT=<git rev-parse --short HEAD here> bash
#                benchmarks/gpu/session.sh", carry=[".whl"], timeout_s=600)
# Afterwards:    copy the returned results/*.json into benchmarks/results/ and rebuild the table
#                (python -m benchmarks.report benchmarks/results), name the card in the note.
#
# Budgets (seconds; override by environment; 0 skips the stage): TESTS_S for the CUDA tests,
# GRAPHS_S for the CUDA-graph probe, BENCH_S for the benchmarks, BENCH_TASKS / BENCH_PROBLEMS / BENCH_REPEATS to narrow them.
# Each stage is cut at its budget and the script goes on, so a slow stage cannot cost the
# others their results.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/curvop_gpu_out}
mkdir -p "$OUT/results"
PY=${PYTHON:-python3}
# at most about 8 minutes (about 4 on an H100), so that a 15-minute lease has room for the start and a rerun
TESTS_S=${TESTS_S:-100}
BENCH_S=${BENCH_S:-240}
FULL_S=${FULL_S:-60}
PROFILE_S=${PROFILE_S:-60}
PROBE_S=${PROBE_S:-0}  # the fold/vmap/loop probe: off unless asked for
GRAPHS_S=${GRAPHS_S:-0}  # the CUDA-graph probe (benchmarks/gpu/probe_graphs.py): off unless asked for
BENCH_PROBLEMS=${BENCH_PROBLEMS:-mlp cnn mlp_layernorm transformer}
BENCH_TASKS=${BENCH_TASKS:-baseline operator_build ggn_product matmat16 hvp kfac_exact kfac_mc}
DEVICE=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1

if ls .whl/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/curvop_site .whl/*.whl || echo "wheel install failed" | tee -a "$OUT/log.txt"
  export PYTHONPATH=/tmp/curvop_site:$PWD
else
  export PYTHONPATH=$PWD
fi

{
  echo "== environment"; date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  "$PY" -c "import sys, torch, linear_operator as lo, scipy; print(sys.version.split()[0], \
'torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else '-', \
'linear_operator', lo.__version__, 'scipy', scipy.__version__)"
  "$PY" -c "import backpack, asdl, laplace, curvlinops; print('peers import')"
} 2>&1 | tee "$OUT/log.txt"

# a stage whose budget is 0 is skipped (`timeout 0` would mean no limit)
if [ "$TESTS_S" -gt 0 ]; then
  echo "== CUDA tests (every case parametrised on cuda, and the gpu marker), ${TESTS_S}s" | tee -a "$OUT/log.txt"
  timeout "$TESTS_S" "$PY" -m pytest -q -p no:cacheprovider -n 8 -x \
    -k "cuda or gpu" -m "not montecarlo and not slow" -rfE --tb=short tests 2>&1 | tail -60 | tee -a "$OUT/log.txt"
  timeout 45 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -15 | tee -a "$OUT/log.txt"
fi

if [ "$GRAPHS_S" -gt 0 ]; then
  echo "== products replayed as CUDA graphs, ${GRAPHS_S}s" | tee -a "$OUT/log.txt"
  timeout "$GRAPHS_S" "$PY" -m benchmarks.gpu.probe_graphs 2>&1 | grep -v -i -E "warn|USDT" \
    | tee -a "$OUT/log.txt"
fi

echo "== benchmarks on $DEVICE: $BENCH_PROBLEMS / $BENCH_TASKS, ${BENCH_S}s" | tee -a "$OUT/log.txt"
# in one process: each child would initialise CUDA again (seconds per entry); peak memory is
# reset per entry by benchmarks.measure on CUDA, so it stays per entry. Interleaved: the
# entries of a problem are timed in turns, so that a host whose speed drifts (H100 leases
# differed by up to 1.8x in the same code) slows all of them alike
# shellcheck disable=SC2086
timeout "$BENCH_S" "$PY" -m benchmarks.run --device "$DEVICE" --isolation interleave \
  --problems $BENCH_PROBLEMS --tasks $BENCH_TASKS --repeats ${BENCH_REPEATS:-40} --budget 1 \
  --out "$OUT/results" 2>&1 | grep -v -i warn | tee -a "$OUT/log.txt"

if [ "$FULL_S" -gt 0 ]; then
  echo "== full() on cnn_small against laplace-torch's backends, ${FULL_S}s" | tee -a "$OUT/log.txt"
  timeout "$FULL_S" "$PY" -m benchmarks.run --device "$DEVICE" --isolation interleave \
    --problems cnn_small --tasks baseline full_ggn --repeats 6 --budget 1 \
    --out "$OUT/results" 2>&1 | grep -v -i warn | tee -a "$OUT/log.txt"
fi

if [ "$PROFILE_S" -gt 0 ]; then
  echo "== where a product's time goes (wall times and profiler tables), ${PROFILE_S}s" | tee "$OUT/profile.txt"
  timeout "$PROFILE_S" "$PY" -m benchmarks.gpu.profile_products --device "$DEVICE" \
    --problems $BENCH_PROBLEMS 2>&1 | grep -v -i -E "warn|USDT" >> "$OUT/profile.txt"
  grep "^==" "$OUT/profile.txt"
fi

if [ "$PROBE_S" -gt 0 ]; then
  echo "== vmap or a loop over columns, per problem (products, kron), ${PROBE_S}s" | tee -a "$OUT/profile.txt"
  timeout "$PROBE_S" "$PY" -m benchmarks.gpu.probe_columns --device "$DEVICE" \
    --problems cnn mlp transformer --profile cnn 2>&1 | grep -v -i -E "warn|USDT" >> "$OUT/profile.txt"
  grep -A9 "^== [a-z_]* on" "$OUT/profile.txt" | grep -v "^--"
fi
rm -f "$OUT/results/README.md"  # rebuilt here; at most 8 files come back (7 with 5 problems)
ls -l "$OUT" "$OUT/results"
