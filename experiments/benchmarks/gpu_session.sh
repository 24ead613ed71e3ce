#!/usr/bin/env bash
# Every Pallas kernel of the project compiled on one NVIDIA GPU, then their benchmarks, in one command that
# fits a short lease of the machine (about 9 minutes; each step has its own time limit, and every benchmark
# writes its results after each row, so a step cut short still leaves what it measured).
#
#   bash experiments/benchmarks/gpu_session.sh OUT_DIR [STEP ...]
#
# STEPs, in this order by default (the most important first): selftest, linear_attention_fla, attention, moe,
# spiking, linear_attention_step; name some to run only those (a second, shorter call after one was cut short). One more step runs
# only by name: linear_attention_passes (the time of each Pallas linear-attention pass, to see which kernel
# to work on).
#
# Run from the repository root. The machine needs jax with CUDA, flax and numpy (the project is put on
# PYTHONPATH, not installed). flash-linear-attention, for the comparison of the linear-attention kernels, comes
# from wheels in .whl/ when that folder exists (prepared where pip works:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl fla-core==0.6.0
# it needs torch, triton and einops from the machine). Writes OUT_DIR/results.tar.gz (every results file:
# selftest_gpu.json and the benchmarks' .json/.md, named as under experiments/benchmarks/results/) and
# OUT_DIR/session.log (everything printed).
set -u
out=${1:?usage: bash experiments/benchmarks/gpu_session.sh OUT_DIR}
mkdir -p "$out"
results=$(mktemp -d)
exec > >(tee "$out/session.log") 2>&1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and PyTorch share the GPU in one process
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step LIMIT_SECONDS COMMAND...: runs one step under a time limit and reports how it ended
  local limit=$1 start=$SECONDS
  shift
  echo "== $* (limit ${limit} s)"
  timeout "$limit" "$@"
  echo "== exit $? after $((SECONDS - start)) s"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
run() {  # run NAME: one step by name
  case $1 in
    selftest) step 200 python3 -m pallas_kernels.selftest --json "$results/selftest_gpu.json" ;;
    linear_attention_fla) step 210 python3 -m experiments.benchmarks.linear_attention_fla \
      --seq-lens 2048,8192,16384 --repeats 10 --out "$results" ;;
    attention) step 70 python3 -m experiments.benchmarks.attention --seq-lens 4096,16384 --repeats 5 \
      --ratio-runs 1 --out "$results" ;;
    moe) step 25 python3 -m experiments.benchmarks.moe --parts gmm --out "$results" ;;
    spiking) step 25 python3 -m experiments.benchmarks.spiking --quick --out "$results" ;;
    linear_attention_step) step 30 python3 -m experiments.benchmarks.linear_attention_step --out "$results" ;;
    linear_attention_passes) step 150 python3 -m experiments.benchmarks.linear_attention_passes --seq-len 8192 \
      --out "$results" ;;
    *) echo "== unknown step $1 (known: selftest linear_attention_fla attention moe spiking" \
      "linear_attention_step linear_attention_passes)" ;;
  esac
}

shift
for name in "${@:-selftest linear_attention_fla attention moe spiking linear_attention_step}"; do
  for one in $name; do run "$one"; done
done
tar czf "$out/results.tar.gz" -C "$results" .
echo "== wrote $out/results.tar.gz"
