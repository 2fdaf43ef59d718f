#!/usr/bin/env bash
# The prepared GPU check (issue 8), for a session lent an H100/H200 (see ../shared/gpu/README.md).
# Here, once (docopt has no wheel on PyPI: build it; drop the image's own packages from .whl):
#   bash ../shared/gpu/make-wheels.sh num2words accelerate psutil py-cpuinfo msgpack einops ninja pytest pluggy iniconfig
#   pip wheel --no-deps docopt -w .whl
# Then run it there with carry=[".whl"], timeout_s about 560:
#   bash bench/gpu-check.sh     # $OUT/bench.jsonl (a line per variant, as each ends), bench.json, gpu-tests.log
# Every figure comes with the card's name and the baselines measured in the same run.
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1 | tee -a "$out/gpu.txt"
# 1. throughput, each variant in its own process (about 6 min): the baselines first, then asr-dist at the seed
#    recipe as written (fp16 16 x 2) and tuned (bf16 32 x 1, compiled or not), large batches, the profile
# (a CPU dry run: PRESET=tiny PRECISION=bf16 UTTS=128 STEPS=2 bash bench/gpu-check.sh)
timeout ${BENCH_S:-370} python3 bench/train_throughput.py --preset ${PRESET:-xlsr-300m} --precision ${PRECISION:-fp16} \
  --utterances ${UTTS:-1536} --steps ${STEPS:-9} --warmup 3 --zero 1 2 --large-micro 48 --timeout 150 --jsonl "$out/bench.jsonl" \
  --only baseline_plain_loop asr_dist_zero1 asr_dist_seed_fast asr_dist_seed_fast_compiled baseline_hf_trainer \
         asr_dist_large_batch_bf16 plain_loop_bucketed_32x1 profile_seed_fast asr_dist_large_batch_bf16_compiled asr_dist_zero2 \
  > "$out/bench.json" 2> "$out/bench.err"
echo "bench exit $?"
cut -c1-400 "$out/bench.jsonl"
# 2. fp16 loss scaling on XLS-R-300M, bf16, ZeRO-3 export
timeout ${TESTS_S:-150} python3 -m pytest -q -x tests/gpu -p no:cacheprovider > "$out/gpu-tests.log" 2>&1
echo "tests exit $?"
tail -5 "$out/gpu-tests.log"
