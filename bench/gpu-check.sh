#!/usr/bin/env bash
# The GPU check: training throughput against the baselines measured in the same run, w2v-BERT 2.0, and
# tests/gpu, on one H100/H200 machine. Every figure comes with the card's name.
#
#   bash bench/gpu-check.sh [WHEELS_DIR]    # results in $OUT (default /tmp/out): gpu.txt, gpu-tests.log,
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
# The whole check fits 8 minutes with the machine's setup, each part with its own limit:
#   throughput  <= BENCH_S (260 s): the variants below in order, each in its own process (--timeout 75 s);
#                  the headline variants first (as shipped, the large-batch mode, 32 x 1 packed and compiled),
#                  so a cut costs only the extra ones
#   w2v-BERT    <= W2VBERT_S (60 s): its 600M layout, bf16, 32 x 1
#   tests/gpu   <= TESTS_S (120 s): the fp16 loss-scale run first (LOSS_SCALE_S, 70 s), the rest with what is left
# A part that reaches its limit gets SIGINT (its processes, training children included, stop at once: SIGTERM
# would let a child save a preemption checkpoint into the next part), then SIGKILL 15 s later.
# PARTS="bench w2vbert tests levers" chooses parts (levers: bench/kernel_levers.py, 70 s, not by default).
# A CPU dry run, with the project's own environment instead of wheels:
#   WHEELS=none PRESET=tiny PRECISION=bf16 UTTS=128 STEPS=2 WARMUP=1 W2VBERT_PRESET=tiny bash bench/gpu-check.sh
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
wheels=${WHEELS:-${1:-.whl}}
parts=" ${PARTS:-bench w2vbert tests} "
if [[ "$wheels" != none ]]; then
  [[ -d "$wheels" ]] || { echo "no wheels directory $wheels (see the top of $0 for how to make one)" >&2; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$out/gpu.txt"
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1 | tee -a "$out/gpu.txt"
stop() { timeout -s INT -k 15 "$@"; }  # a part's limit (see above)
table() {  # a table of the lines written so far (a part may have been cut by its limit), ratios to the baselines
  [[ -s "$1" ]] || { echo "(no variant finished: see ${1%.jsonl}.err)"; return; }
  python3 - "$1" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
base = {r["variant"]: r.get("audio_seconds_per_second") for r in rows}
plain, trainer = base.get("baseline_plain_loop"), base.get("baseline_hf_trainer")
for r in rows:
    a = r.get("audio_seconds_per_second")
    extra = "".join(f"  {k} {r[k]}" for k in ("precision", "micro_batch_size", "micro_batch_seconds", "shapes_per_epoch", "padding_fraction",
                                              "capacities_seconds") if k in r)
    extra += f"  windows {r['windows']}" if "windows" in r else ""
    if a is None:
        print(f"{r['variant']:40s} {r.get('error', '?')[:200]}")
        continue
    ratios = "".join(f"  {a / b:5.2f}x {n}" for n, b in (("plain", plain), ("trainer", trainer)) if b)
    print(f"{r['variant']:40s} {a:8.1f} audio s/s{ratios}  {r.get('peak_gpu_memory_gb', 0):.1f} GB{extra}")
PY
}
if [[ "$parts" == *" levers "* ]]; then  # kernel levers at XLS-R sizes, each against the direct computation
  stop 70 python3 bench/kernel_levers.py --batch 32 --dtype bf16 > "$out/kernel_levers.json" 2> "$out/kernel_levers.err"
  grep -E '"(eager_ms|fused_ms|speedup.*|direct.*_ms|fft_ms|max_.*|wall_seconds_with_compilation)"' "$out/kernel_levers.json"
fi
# 1. throughput, the headline variants first: the baselines, configs/xlsr300m-danish.yaml as shipped (precision,
#    packing and micro-batch size chosen for this GPU; the table shows which), the large-batch mode packed (600 s
#    micro-batches), 32 x 1 packed and compiled; then, as time allows, the large-batch mode at the seconds the
#    memory probe chooses, the seed's batch as a user would first write it (16 x 2, ZeRO-1, fp16), 32 x 1 packed
#    (sdpa, flex attention), the seed's batch packed, the large-batch mode padded and 32 x 1 padded. Variant names
#    say no precision (--list names them; VARIANTS="a b" runs others).
if [[ "$parts" == *" bench "* ]]; then
  stop ${BENCH_S:-260} python3 bench/train_throughput.py --preset ${PRESET:-xlsr-300m} --precision ${PRECISION:-fp16} \
    --utterances ${UTTS:-1536} --steps ${STEPS:-12} --warmup ${WARMUP:-4} --zero 1 --large-micro 0 --timeout 75 \
    --jsonl "$out/bench.jsonl" \
    --only ${VARIANTS:-baseline_hf_trainer baseline_plain_loop asr_dist_shipped asr_dist_large_seconds_packed \
           asr_dist_seed_fast_packed_compiled asr_dist_large_seconds_packed_auto asr_dist_zero1 \
           asr_dist_seed_fast_packed asr_dist_seed_fast_packed_flex asr_dist_zero1_packed asr_dist_large_seconds \
           asr_dist_seed_fast} \
    > "$out/bench.json" 2> "$out/bench.err"
  echo "bench exit $?"
  table "$out/bench.jsonl"
fi
# 2. w2v-BERT 2.0 at its 600M layout (relative-position attention: no flash kernel), in its own process
if [[ "$parts" == *" w2vbert "* ]]; then
  # (STEPS + WARMUP) x 32 utterances (and two steps' spare) are all it reads: fewer shards to build leave the variant
  # its time; its own limit leaves 20 s for stopping it and writing the table
  stop ${W2VBERT_S:-60} python3 bench/train_throughput.py --family wav2vec2-bert --preset ${W2VBERT_PRESET:-600m} \
    --precision bf16 --utterances $(( 32 * (${STEPS:-12} + ${WARMUP:-4} + 2) )) --steps ${STEPS:-12} --warmup ${WARMUP:-4} \
    --zero 1 --large-micro 0 --large-seconds 0 --timeout $(( ${W2VBERT_S:-60} - 20 )) --jsonl "$out/w2vbert.jsonl" \
    --only asr_dist_seed_fast \
    > "$out/w2vbert.json" 2> "$out/w2vbert.err"
  echo "w2v-BERT exit $?"
  table "$out/w2vbert.jsonl"
fi
# 3. tests/gpu: fp16 loss scaling on XLS-R-300M (1-4 s utterances, the longest) with its own limit, then bf16,
#    ZeRO-3 export, the memory probe, the attention switch, the sync-free forward and the conformer in fp16 with what
#    is left of TESTS_S
#    (SIGINT lets pytest print the results of the tests that finished)
if [[ "$parts" == *" tests "* ]]; then
  start=$SECONDS
  stop ${LOSS_SCALE_S:-70} python3 -m pytest -q -rA -s tests/gpu -p no:cacheprovider -k "loss_scale" > "$out/gpu-tests.log" 2>&1
  echo "loss-scale test exit $?"
  left=$(( ${TESTS_S:-120} - (SECONDS - start) ))
  if (( left > 10 )); then
    stop $left python3 -m pytest -q -rA -s tests/gpu -p no:cacheprovider -k "not loss_scale" >> "$out/gpu-tests.log" 2>&1
    echo "tests exit $?"
  else
    echo "the other tests not run: ${left} s left of TESTS_S"
  fi
  grep -E "PASSED|FAILED|ERROR|SKIPPED|cudnn_attention=|passed|failed" "$out/gpu-tests.log" | tail -14
fi
