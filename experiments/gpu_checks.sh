#!/usr/bin/env bash
# The accelerator checks, in one run on a machine with a GPU and this repository's dependencies:
# the single-device numerics tests on the GPU, then the benchmarks at their GPU shapes (the
# fused head at Llama-3-8B's 8192 x 4096 x 128256). Usage: experiments/gpu_checks.sh OUT_DIR
# (SMALL=1 shrinks every shape, to try the script on a CPU). Each step has its own time limit,
# so one that overruns costs only its own results; OUT_DIR/gpu_checks.tgz holds every step's log,
# JSON and markdown, repacked after each step. On this workplace's lent GPUs (jax, flax, optax,
# chex, torch already there) the rest travels as wheels: omegaconf antlr4-python3-runtime
# jax-bitempered-loss jax-cce tokamax qwix einshape immutabledict tensorboardx typeguard pydantic
# pydantic-core annotated-types typing-inspection (installed with --target, on PYTHONPATH).
set -uo pipefail
out=${1:?usage: experiments/gpu_checks.sh OUT_DIR}
res=$(mktemp -d)
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
small=${SMALL:-0}
pack() { tar czf "$out/gpu_checks.tgz" -C "$res" .; }
step() {  # step NAME SECONDS COMMAND...: run with a limit, log it, keep going on failure
  local name=$1 limit=$2; shift 2
  case " ${ONLY:-$name} " in *" $name "*) ;; *) return ;; esac  # ONLY="tests bench_variants"
  echo "=== $name ($(date -u +%T), limit ${limit}s)"
  timeout "$limit" "$@" >"$res/$name.log" 2>&1
  echo "=== $name: exit $? ($(date -u +%T))"; tail -n 25 "$res/$name.log"; pack
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import jax, sys; print(sys.version.split()[0], 'jax', jax.__version__, jax.devices())"

# float32 products at full precision: the tests compare with float64 at rtol 1e-5, and
# XLA:GPU's default precision rounds float32 operands to TF32.
step tests "${TEST_LIMIT:-170}" env JAX_DEFAULT_MATMUL_PRECISION=highest python3 -m pytest -v \
  -n "${WORKERS:-14}" -p no:cacheprovider --durations=8 --tb=line -rf \
  ${TESTS:-tests/losses/test_cross_entropy.py tests/fused/test_linear.py tests/losses/test_variants.py \
  tests/core/test_engine.py tests/losses/test_bitempered.py tests/losses/test_optax_compat.py \
  tests/losses/test_torch_parity.py tests/registry/test_own_losses.py} -k "not vocab_parallel_form and not over_vocabulary_shards"

if [ "$small" = 1 ]; then
  n=256 d=64 v=2048 vn=256 vv=2048
else
  n=8192 d=4096 v=128256 vn=8192 vv=32768
fi
# The headline shape (two passes) with a block-size sweep, by default the CPU's blocks
# ([128, V] float32 rows, [1024, 4096] vocabulary-major) and others; no shape series (the flags
# without values). Then the one-pass shape of bench_fused_variants with a token-chunk sweep.
step bench_linear 200 python3 experiments/bench_linear.py --n $n --d $d --v $v --reps 7 \
  --vocab-series --token-series --blocks ${BLOCKS:-128:$v 1024:4096 $((n / 2)):- $n:$((v / 32))} \
  --out "$res/bench_linear"
# The same head with the autotuner on (XENT_JAX_AUTOTUNE=1): the default-schedule row times the
# tuned blocks (tuning, a few compiled candidates, runs in the warm-up call); the chosen blocks are
# in bench_linear_autotune.log and the cache file, kept with the results.
step bench_linear_autotune 300 env XENT_JAX_AUTOTUNE=1 XDG_CACHE_HOME="$res/xent_cache" bash -c \
  "python3 experiments/bench_linear.py --n $n --d $d --v $v --reps 7 --vocab-series \
  --token-series --out '$res/bench_linear_autotune' && cat '$res/xent_cache/xent_jax/blocks.json'"
step bench_linear_one_pass 90 python3 experiments/bench_linear.py --n $((vn / 2)) --d $((d / 8)) \
  --v $vv --reps 10 --vocab-series --token-series --blocks 512:- 2048:- 4096:- \
  --out "$res/bench_linear_one_pass"
step bench_cross_entropy 45 python3 experiments/bench_cross_entropy.py --tokens $vn \
  --vocab $vv --out "$res/bench_cross_entropy"
step bench_variants 100 env JAX_PLATFORMS=cuda python3 experiments/bench_variants.py --n $vn --v $vv --reps 10 \
  --out "$res/bench_variants"
# bench_variants_smoothing and bench_variants_cpu_branches differ only in --cpu-branches: run both
# in one call to compare them.
step bench_variants_smoothing 60 env JAX_PLATFORMS=cuda python3 experiments/bench_variants.py \
  --n $vn --v $vv --reps 10 --dtypes bfloat16 --smoothing 0.1 --out "$res/bench_variants_smoothing"
step bench_variants_cpu_branches 60 env JAX_PLATFORMS=cuda python3 experiments/bench_variants.py \
  --n $vn --v $vv --reps 10 --dtypes bfloat16 --smoothing 0.1 --cpu-branches \
  --out "$res/bench_variants_cpu_branches"
step bench_variants_bi_tempered 40 env JAX_PLATFORMS=cuda python3 experiments/bench_variants.py \
  --n $vn --v $vv --reps 10 --losses bi_tempered --smoothing 0.0 \
  --out "$res/bench_variants_bi_tempered"
step bench_fused_variants 50 env JAX_PLATFORMS=cuda python3 experiments/bench_fused_variants.py --n $((vn / 2)) \
  --d $((d / 8)) --v $vv --reps 10 --out "$res/bench_fused_variants"
# The variants at the Llama-3-8B head (half the tokens): blocked statistics against rematerialised
# token chunks, time, temp memory and the weight gradient's bf16 error (never measured on a GPU).
step bench_fused_heads 150 env JAX_PLATFORMS=cuda python3 experiments/bench_fused_heads.py \
  --n $((n / 2)) --d $d --v $v --reps 5 --out "$res/bench_fused_heads"
# Issue 18: the MNIST-1D label-noise comparison vectorized (members vmapped) against --sequential,
# one seed (21 runs) to fit the budget; target >= 30x.
step bench_sweeps 540 env JAX_PLATFORMS=cuda python3 experiments/bench_sweeps.py \
  --config configs/mnist1d_label_noise.yaml --group-mode vmap --out "$res/bench_sweeps" \
  'compare.seeds=[0]'
