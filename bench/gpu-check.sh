#!/usr/bin/env bash
# The GPU check: kernel levers, training throughput against the baselines measured in the same run, and
# tests/gpu, on one H100/H200 machine. Every figure comes with the card's name.
#
#   bash bench/gpu-check.sh [WHEELS_DIR]    # results in $OUT (default /tmp/out): gpu-tests.log,
#                                           # bench.jsonl (a line per variant, as each ends), bench.json
#
# A GPU machine with no package registry gets what its image lacks from a directory of wheels, WHEELS_DIR
# (default .whl), installed with `pip --no-index` into /tmp/site. An NVIDIA PyTorch image typically has
# torch, transformers, tensorboard, numpy and tqdm; make the rest on a machine that has a registry, for the
# GPU machine's Python (`python3 -V` there) and platform, and send the directory along with the tree:
#   plat="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 --platform any"
#   pip download --no-deps $plat -d .whl webdataset braceexpand jiwer rapidfuzz soundfile cffi pycparser soxr \
#       omegaconf antlr4-python3-runtime hjson pydantic pydantic-core annotated-types typing-inspection \
#       typing-extensions num2words accelerate psutil py-cpuinfo msgpack einops ninja pytest pluggy iniconfig
#   pip download --no-deps --no-binary=:all: deepspeed==0.19.8 -d src    # built in a venv that has torch:
#   pip wheel --no-deps --no-build-isolation -w .whl src/deepspeed-*
#   pip wheel --no-deps -w .whl docopt    # num2words needs it; both are published as source only
# (`pip check` on the GPU machine with PYTHONPATH=/tmp/site names anything still missing.)
# The whole check fits one call of about ten minutes: kernel levers <= 70 s, throughput <= BENCH_S (330 s),
# tests/gpu <= TESTS_S (160 s); PARTS=bench or PARTS=tests runs one part.
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
wheels=${1:-.whl}
[[ -d "$wheels" ]] || { echo "no wheels directory $wheels (see the top of $0 for how to make one)" >&2; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1 | tee -a "$out/gpu.txt"
# 1. throughput, each variant in its own process, results as each ends, most telling first. Fixed-shape steps
#    measured 2-2.5x faster than training's varying ones, and cuDNN's attention builds a graph per new shape, so
#    the A/B pairs come first: PyTorch's choice (cuDNN attention) against none, in the plain loop (new shapes
#    every step, and 4 shapes repeated: step_ms) and in asr-dist; then the baselines; then the two host-sync
#    levers asr-dist turns off, turned back on one at a time (transformers' forward: *_hf_forward; DeepSpeed's
#    throughput timer: *_ds_timer); then asr-dist's recipes side by side.
# The list runs in order until BENCH_S (the first six to eight in 330 s). VARIANTS="a b" runs others (--list names them).
# (a CPU dry run: PRESET=tiny PRECISION=bf16 UTTS=128 STEPS=2 WARMUP=1 bash bench/gpu-check.sh)
if [[ " ${PARTS:-bench tests} " == *" bench "* ]]; then
  # kernel levers at XLS-R sizes, each against the direct computation: the feature encoder's fused norm + GELU
  # (model.compile), the positional convolution by FFT (model.fft_positional_conv) and with cuDNN autotuning
  timeout 70 python3 bench/kernel_levers.py --batch 32 --dtype bf16 > "$out/kernel_levers.json" 2>&1
  grep -E '"(eager_ms|fused_ms|speedup.*|direct.*_ms|fft_ms|max_.*|wall_seconds_with_compilation)"' "$out/kernel_levers.json"
  timeout ${BENCH_S:-330} python3 bench/train_throughput.py --preset ${PRESET:-xlsr-300m} --precision ${PRECISION:-fp16} \
    --utterances ${UTTS:-1536} --steps ${STEPS:-18} --warmup ${WARMUP:-6} --zero 1 --large-micro 48 --timeout 120 \
    --jsonl "$out/bench.jsonl" \
    --only ${VARIANTS:-plain_loop_bucketed_32x1 plain_loop_bucketed_32x1_no_cudnn_sdpa asr_dist_seed_fast \
           baseline_plain_loop baseline_hf_trainer asr_dist_seed_fast_hf_forward asr_dist_seed_fast_ds_timer \
           asr_dist_seed_fast_pad1s_long asr_dist_large_seconds_bf16_pad1s asr_dist_zero1 asr_dist_zero1_ds_timer \
           asr_dist_zero1_hf_forward asr_dist_large_batch_bf16_pad1s asr_dist_seed_fast_pad1s_long_fft_conv \
           asr_dist_seed_fast_pad1s_long_compiled asr_dist_seed_fast_profiled asr_dist_seed_fast_cudnn_attention \
           asr_dist_seed_fast_pad1s_long_cudnn_benchmark plain_loop_bucketed_32x1_repeat4 \
           plain_loop_bucketed_32x1_repeat4_no_cudnn_sdpa} \
    > "$out/bench.json" 2> "$out/bench.err"
  echo "bench exit $?"
  # a table from the lines written so far (the run may have been cut by BENCH_S), ratios to this run's baselines
  python3 - "$out/bench.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
base = {r["variant"]: r.get("audio_seconds_per_second") for r in rows}
plain, trainer = base.get("baseline_plain_loop"), base.get("baseline_hf_trainer")
for r in rows:
    a = r.get("audio_seconds_per_second")
    extra = (f"  windows {r['windows']}" if "windows" in r else "") + (f"  step_ms {r['step_ms']}" if "step_ms" in r else "")
    if a is None:
        print(f"{r['variant']:48s} {r.get('error', '?')[:200]}")
        continue
    ratios = "".join(f"  {a / b:5.2f}x {n}" for n, b in (("plain", plain), ("trainer", trainer)) if b)
    print(f"{r['variant']:48s} {a:8.1f} audio s/s{ratios}  {r.get('peak_gpu_memory_gb', 0):.1f} GB{extra}")
    for line in r.get("profile_top", [])[:20]:
        print("    " + line[:160])
PY
fi
# 2. fp16 loss scaling on XLS-R-300M for 200 steps (1-4 s utterances), bf16, ZeRO-3 export, the attention switch
if [[ " ${PARTS:-bench tests} " == *" tests "* ]]; then
  timeout ${TESTS_S:-160} python3 -m pytest -q -rA -s tests/gpu -p no:cacheprovider > "$out/gpu-tests.log" 2>&1
  echo "tests exit $?"
  grep -E "PASSED|FAILED|ERROR|cudnn_attention=|passed|failed" "$out/gpu-tests.log" | tail -12
fi
