#!/usr/bin/env bash
# The prepared GPU check (issue 8), for a session lent an H100/H200 (see ../shared/gpu/README.md).
# Here, once (docopt has no wheel on PyPI: build it; drop the image's own packages from .whl):
#   bash ../shared/gpu/make-wheels.sh num2words accelerate psutil py-cpuinfo msgpack einops ninja pytest pluggy iniconfig
#   pip wheel --no-deps docopt -w .whl
# Then run it there with carry=[".whl"], timeout_s 600 (tests about 4 min, bench 5; PARTS=tests or PARTS=bench runs one):
#   bash bench/gpu-check.sh     # $OUT/gpu-tests.log, bench.jsonl (a line per variant, as each ends), bench.json
# Every figure comes with the card's name and the baselines measured in the same run.
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1 | tee -a "$out/gpu.txt"
# 1. fp16 loss scaling on XLS-R-300M for 200 steps, bf16, ZeRO-3 export (about 4 min; 150 s was not enough)
if [[ " ${PARTS:-tests bench} " == *" tests "* ]]; then
  timeout ${TESTS_S:-250} python3 -m pytest -q -rA tests/gpu -p no:cacheprovider > "$out/gpu-tests.log" 2>&1
  echo "tests exit $?"
  tail -5 "$out/gpu-tests.log"
fi
[[ " ${PARTS:-tests bench} " == *" bench "* ]] || exit 0
# 2. throughput, each variant in its own process, results as each ends. The baselines and asr-dist's recipes
#    side by side, then the shape study (session 3 found fixed-shape steps 2-2.5x faster than training's
#    varying ones): the same 4 batches repeated (step_ms per step), no cuDNN attention, expandable allocator
#    segments, and the profile over varying batches with host-side ops.
# (a CPU dry run: PRESET=tiny PRECISION=bf16 UTTS=128 STEPS=2 bash bench/gpu-check.sh)
timeout ${BENCH_S:-320} python3 bench/train_throughput.py --preset ${PRESET:-xlsr-300m} --precision ${PRECISION:-fp16} \
  --utterances ${UTTS:-1536} --steps ${STEPS:-15} --warmup 5 --zero 1 2 --large-micro 48 --timeout 100 --jsonl "$out/bench.jsonl" \
  --only baseline_plain_loop baseline_hf_trainer asr_dist_seed_fast_pad1s plain_loop_bucketed_32x1_repeat4 \
         plain_loop_bucketed_32x1 profile_varying plain_loop_bucketed_32x1_expandable plain_loop_bucketed_32x1_no_cudnn_sdpa \
         asr_dist_zero1 asr_dist_large_batch_bf16_pad1s asr_dist_seed_fast_compiled_pad1s \
  > "$out/bench.json" 2> "$out/bench.err"
echo "bench exit $?"
cut -c1-400 "$out/bench.jsonl"
