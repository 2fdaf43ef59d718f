#!/usr/bin/env bash
# The prepared GPU check (issue 8), for a session lent an H100/H200 (see ../shared/gpu/README.md).
# Here, once:   bash ../shared/gpu/make-wheels.sh num2words docopt accelerate psutil kenlm
# Then run it there with carry=[".whl"], e.g. timeout_s=540:
#   bash bench/gpu-check.sh            # writes $OUT/bench.json, $OUT/gpu-tests.log
# Every figure printed comes with the card's name and the baselines measured in the same run.
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
# 1. throughput: Trainer, plain loop, asr-dist ZeRO-1/2 at the seed recipe, large-batch bf16 (about 4 min)
timeout 330 python3 bench/train_throughput.py --preset xlsr-300m --precision fp16 --utterances 640 --steps 12 \
  --warmup 3 --zero 1 2 --large-micro 64 > "$out/bench.json" 2> "$out/bench.err"
tail -c 3000 "$out/bench.json"
# 2. fp16 loss scaling, bf16, ZeRO-3 export
timeout 200 python3 -m pytest -q -x tests/gpu -p no:cacheprovider > "$out/gpu-tests.log" 2>&1
tail -5 "$out/gpu-tests.log"
