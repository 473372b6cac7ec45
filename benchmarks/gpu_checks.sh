#!/usr/bin/env bash
# Every check that needs a CUDA device, in one run of a few minutes:
#   - gpu-marked tests: the compiled Triton kernels against flash SDPA, the torch Gaussian
#     renderer on CUDA against CPU and against gsplat;
#   - benchmarks/kernels.py: block-sparse attention speed and memory vs SDPA / FlexAttention,
#     the fused attention JVP;
#   - benchmarks/video_blade.py on CUDA: BLADE end to end with the Triton kernel skipping tiles;
#   - benchmarks/threed.py --sections renderer: our renderer vs gsplat, time and max error.
# gsplat ships as source and compiles its CUDA extension on first import, so that build starts
# first, in the background. JSON results and the build log go to OUTDIR; the rest to stdout.
#
#   bash benchmarks/gpu_checks.sh OUTDIR
set -u
out=${1:-benchmarks/results/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-12}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

(timeout "${GSPLAT_BUILD_S:-400}" $py -c "from gsplat.cuda._backend import _C; print('gsplat built:', _C)" \
  >"$out/gsplat_build.log" 2>&1) &
build=$!

step() {  # step NAME SECONDS CMD...: run with a time limit, print its exit status
  local name=$1 limit=$2
  shift 2
  echo "==== $name ($(date +%T))"
  timeout "$limit" "$@"
  echo "==== $name rc=$?"
}

step kernel-tests 150 $py -m pytest tests/core/kernels/test_gpu.py -p no:cacheprovider -q
step kernels 200 $py benchmarks/kernels.py --out "$out/kernels.json"
# BLADE at 8,192 tokens (16 x 128 x 128, patches 2 x 4 x 4) and 32,768 (16 x 256 x 256)
step blade-8k 150 $py benchmarks/video_blade.py --device cuda --dtype bfloat16 --frames 16 \
  --size 128 --dim 512 --depth 8 --heads 8 --block 64 --tile 1 8 8 --out "$out/video_blade_8k.json"
step blade-32k 200 $py benchmarks/video_blade.py --device cuda --dtype bfloat16 --frames 16 \
  --size 256 --dim 512 --depth 4 --heads 8 --block 64 --tile 1 8 8 --repeats 2 \
  --out "$out/video_blade_32k.json"
echo "==== waiting for the gsplat build ($(date +%T))"
wait $build
echo "==== gsplat build rc=$?"
tail -n 5 "$out/gsplat_build.log"
step threed-tests 120 $py -m pytest tests/threed/test_gaussians.py -m gpu -p no:cacheprovider -q
step renderer 150 $py benchmarks/threed.py --sections renderer --threads 8 \
  --out "$out/threed_renderer.json"
