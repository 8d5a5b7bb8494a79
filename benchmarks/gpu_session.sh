#!/bin/bash
# One GPU-machine session: install carried wheels, build the C++ extension, then run the phases asked for.
# usage: OUT=dir bash benchmarks/gpu_session.sh PHASE...   (phases run in order; each writes its own files to $OUT)
#   gluon-api   print the installed Gluon Hopper API (dir of the modules the Hopper kernel uses)
#   hopper-tests  GPU tests of the Gluon Hopper forward and backward (tests/sigattn/test_gpu_hopper*.py) -> hopper_tests.log
#   bench-hopper  attention benchmark with $BENCH_ARGS (default: D=128, fwd, Hopper vs portable vs anchors)
#                                                                                     -> attention_hopper.json
#   hopper-variants  Hopper forward variants side by side ($VARIANTS: BM,BN,STAGES,CONSUMERS,SIG,DEPTH each;
#               default: the D=128 default; two consumers: DEPTH 1, DEPTH-3 ping-pong, DEPTH-4 ping-pong (named
#               barriers); two consumers need >= 3 stages), N 1K-16K, 0/25 % padding, with the no-sigmoid probe of
#               each (PROBE= turns it off); BASE=file (another hopper_fwd.py, carried) runs configs 'base:...' on it;
#               LAYOUTS="padded varlen" times both calls
#                                                                                     -> attention_hopper_variants.json
#   tests       GPU-marked op tests (tests/sigattn), pytest-xdist over $TEST_WORKERS (8) workers     -> gpu_tests.log
#               (SIGATTN_HOPPER_BWD=1 in the environment: every op test's backward through the Hopper kernel;
#               ~600 tests take ~300 s on 8 workers: raise TEST_TIMEOUT, or TEST_WORKERS on a 16-core machine)
#   dqtma-tests  GPU tests of the portable backward's dQ by TMA reductions (test_dq_by_tma_*, by node id: a -k
#               expression matched the whole file on the device) and of the API's sync-free calls   -> dqtma_tests.log
#               then time it: BENCH_ARGS="--d 128 64 --modes bwd --pad 0 25 --kernels ours_dqatomic_padded
#               ours_dqatomic_varlen ours_dqtma_padded ours_dqtma_varlen tsig sdpa_cudnn" ... bench-hopper
#   trainer-tests  every gpu-marked test under tests/training and tests/launch (by marker; trainer, validation loss,
#               embeddings, CUDA graphs), serial, kit versions first; needs the kit (bash benchmarks/gpu_wheels.sh)
#                                                                                     -> trainer_gpu_tests.log
#   bench-d128  attention benchmark, D=128, every N/padding/kernel                   -> attention_d128.json
#   bench-d64   attention benchmark, D=64 (+ peak memory at N=16384, cold start)      -> attention_d64.json
#   train       trainer throughput, 160m@2K/8K and 1.4b@8K, sigmoid vs softmax        -> training_gpu.json/.md
#   train-real  the data path: real MDS shards through the real loader vs synthetic cells of the same mean length,
#               $REAL_RUNS (default 160m@2K, 1.4b@8K; $REAL_MDS, default runs/demo/corpus: `make demo` builds it from
#               PBMC 3k; carry it)                                                   -> training_real.json/.md
#   cp          context-parallel training on every local GPU (benchmarks/context_parallel.py), $CP_RUNS
#               (PRESET:CONTEXT:P[:C[:EXCHANGE]]; default: the script's list, one exchange vs pipelined head chunks;
#               EXCHANGE auto|deepspeed|ours), $CP_SETTINGS
#               (preset | plan: launch.memory.plan's ZeRO/checkpointing/micro-batch for the card); multi-GPU
#               kinds only, with NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
#                                                                                     -> context_parallel.json/.md
#   stability   python -m training.reproduce stability --scale gpu $STAB_ARGS (e.g. "--lrs 1e-2 --attention sigmoid"),
#               continuing the committed $STAB_DIR (default docs/reproduce/stability-gpu; finished arms are reused,
#               another budget is refused: a constant-LR ladder, "--min-lr-ratio 1", goes to its own STAB_DIR, e.g.
#               docs/reproduce/stability-gpu-constant); the arms come back as a tarball (the device's copy-back drops
#               the arm folders; on a multi-GPU kind the arms train side by side, one per GPU)
#                                                                      -> stability-gpu/, stability-gpu-arms.tgz
#   quality     python -m training.reproduce quality --scale gpu --stage device $QUALITY_ARGS (e.g. "--seeds 0 1"): the
#               GPU half of the quality recipe (training, val loss, embeddings) on the corpus and held-out cells that
#               `--stage prepare` wrote here (carry runs/reproduce/quality-gpu/corpus/mds, …/corpus/manifest.json,
#               …/corpus/vocab.tsv and …/heldout); each arm comes back as quality-ARM.tgz (no checkpoints; ~10 MB with
#               both poolings), packed as soon as it is trained; a call fits 3 trained arms (~125–165 s each) or 5
#               untrained ones (~65–100 s), within 600 s and the 8 files that come back (build.log goes into
#               quality.log; remove header.txt at the end of the command for a fifth untrained arm). On a multi-GPU
#               kind the arms train side by side, one per GPU (the recipe's --gpus auto): nvidia-h200-x2 fits twice
#               the arms per call (the 8 files then cap it: 7 arms at most with quality.log). Another budget
#               (e.g. "--steps 1600") goes to its own $QUALITY_DIR holding a copy of corpus/ and heldout/ (a finished
#               arm of another budget is refused, never overwritten); unpack into runs/reproduce/quality-gpu/arms, then `--stage host` on a CPU
#                                                                                     -> quality-*.tgz, quality.log
#   stress      benchmarks/stress_attention.py: the kernels called again and again on the same inputs, compared bitwise with
#               the first call (a race shows as a mismatch or a NaN), with $STRESS_LOAD (4) other processes loading the GPU
#               (0: none), $STRESS_SECONDS (20) per case, $STRESS_ARGS (default "--fill-uninitialized": every
#               torch.empty NaN-filled, which found session 20's barrier bug; set it empty for none; e.g. "--cases
#               encoder:160m op:varlen:64:12")                                       -> stress_attention.json
#   configs     benchmarks/attention_configs.py $CONFIGS_ARGS (default: the 160m preset's backward, D=64, varlen, N 4K/8K,
#               the autotune set's best tile and the candidates built offline without spills or with few:
#               32,128,8,3 / 32,256,8,3 / 32,256,16,3 / 64,128,8,2 / 64,128,8,4): each tile timed and checked
#               against the autotuned call                                              -> attention_configs.json
#   speed       python -m training.reproduce speed --scale gpu $SPEED_ARGS: sigmoid vs softmax trainer tokens/s at
#               2K/4K/8K (160m) and the paper's GPU-hour table; the folder comes back as a tarball (7 files) -> speed-gpu.tgz
#   profile     where a training step's time goes (torch.profiler by kernel category), $PROFILE_RUNS, $PROFILE_ARGS
#               (e.g. "--attention sigmoid --copies": rank the Python sources of device copies)  -> profile/
#   project     launch.project --measure, 4 sizes x 3 contexts x 2 attentions         -> projection-measured/
# Knobs: TRAIN_RUNS, TRAIN_STEPS, TRAIN_WORLD (e.g. "1 2 4": data-parallel rows), TRAIN_ATTENTION (default "sigmoid
# softmax"), TRAIN_OVERRIDES (trainer overrides, e.g. "run.compile=true"), TRAIN_OUT (file name under $OUT, e.g.
# training_compiled.json, to run the phase twice in one call), TRAIN_VARIANTS (e.g. "noprefetch=run.prefetch=false
# default= skip=optim.device_skip=true": the phase once per variant, training_<name>.json each), PROJECT_SIZES, and
# *_TIMEOUT per phase (seconds).
# CLOCKS=0 turns off the GPU clock sampling (see below).
# Wheels for the packages the GPU image lacks (deepspeed, mosaicml-streaming, zarr, anndata, submitit, pydantic, ...,
# triton-sigmoid) travel in .whl/: build the kit here with `bash benchmarks/gpu_wheels.sh`, carry ".whl".
set -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi -L; date -u +%FT%TZ; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"; } | tee "$OUT/header.txt"
# SM clock, power, temperature and clock-event reasons for the whole call, summarised after each phase over its busy
# samples (benchmarks/gpu_clocks.py) into the log and $OUT/clocks.jsonl; CLOCKS=0: no sampling (and one file less).
CLOCKS_CSV=/tmp/gpu_clocks.csv; rm -f "$CLOCKS_CSV"
if [ "${CLOCKS:-1}" != 0 ] && command -v nvidia-smi >/dev/null; then
  q=timestamp,index,utilization.gpu,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu
  nvidia-smi --query-gpu=$q,clocks_event_reasons.active --format=csv,noheader >/dev/null 2>&1 && q=$q,clocks_event_reasons.active
  nvidia-smi --query-gpu=$q --format=csv,noheader,nounits -lms 500 > "$CLOCKS_CSV" 2>/dev/null & clocks_pid=$!
  trap 'kill $clocks_pid 2>/dev/null' EXIT
fi
if ! ls sigattn/_C*.so >/dev/null 2>&1; then  # build only where no extension is built yet
  (time MAX_JOBS=16 python3 setup.py -q build_ext --inplace) > "$OUT/build.log" 2>&1 && echo "C++ extension built" \
    || { echo "C++ build failed"; tail -20 "$OUT/build.log"; exit 1; }
fi
for phase in "$@"; do
  t0=$(date +%s); ts0=$(date +%s.%N)
  case "$phase" in
    gluon-api)
      python3 -c "import triton.experimental.gluon.language.nvidia.hopper as h, triton.experimental.gluon.language as gl; print('hopper:', [n for n in dir(h) if not n.startswith('_')]); print('tma:', [n for n in dir(h.tma) if not n.startswith('_')]); print('mbarrier:', [n for n in dir(h.mbarrier) if not n.startswith('_')])" 2>&1 | tee "$OUT/gluon_api.txt" ;;
    hopper-tests)
      { cat "$OUT/header.txt"; timeout "${TEST_TIMEOUT:-330}" python3 -m pytest -p no:cacheprovider -q -rfE -m gpu \
          -n 8 tests/sigattn/test_gpu_hopper.py tests/sigattn/test_gpu_hopper_bwd.py; } 2>&1 | tee "$OUT/hopper_tests.log" | grep -E "passed|failed|FAILED|Error|error" | tail -25 ;;
    bench-hopper)
      timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/attention.py ${BENCH_ARGS:---d 128 --modes fwd --pad 0 25 \
        --kernels hopper_padded hopper_varlen ours_padded ours_varlen tsig sdpa_cudnn} --out "$OUT/${BENCH_OUT:-attention_hopper.json}" 2>&1 \
        | grep -v "^benchmark:" | tail -45 ;;
    hopper-variants)
      timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/attention_hopper_variants.py --d 128 --n 1024 4096 8192 16384 \
        --pad 0 25 --configs ${VARIANTS:-128,64,4,1,3,2 128,64,4,2,3,1 128,64,4,2,3,3 128,64,4,2,3,4} ${PROBE---probe} \
        ${BASE:+--base base=$BASE} --layouts ${LAYOUTS:-padded} --out "$OUT/attention_hopper_variants.json" 2>&1 | tail -40 ;;
    tests)
      { cat "$OUT/header.txt"; timeout "${TEST_TIMEOUT:-330}" python3 -m pytest -p no:cacheprovider -q -rfE -m gpu \
          -n "${TEST_WORKERS:-8}" tests/sigattn; } 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|FAILED|Error" | tail -25 ;;
    dqtma-tests)
      { cat "$OUT/header.txt"; timeout "${TEST_TIMEOUT:-330}" python3 -m pytest -p no:cacheprovider -q -rfE -m gpu \
          -n "${TEST_WORKERS:-8}" tests/sigattn/test_gpu_kernels.py::test_dq_by_tma_reductions \
          tests/sigattn/test_gpu_kernels.py::test_dq_by_tma_reductions_long_and_autotuned tests/sigattn/test_gpu_host_sync.py; } 2>&1 \
        | tee "$OUT/dqtma_tests.log" | grep -E "passed|failed|FAILED|Error" | tail -25 ;;
    trainer-tests)
      { cat "$OUT/header.txt"
        python3 -c "import importlib.metadata as m; print(' '.join(f'{n} {m.version(n)}' for n in ('deepspeed', 'mosaicml-streaming', 'zarr', 'anndata', 'submitit', 'pandas', 'numpy', 'transformers', 'torchvision')))"
        timeout "${TRAINER_TEST_TIMEOUT:-240}" python3 -m pytest -p no:cacheprovider -q -rfEs -m gpu --durations=8 \
          tests/training tests/launch; } 2>&1 | tee "$OUT/trainer_gpu_tests.log" | grep -E "passed|failed|FAILED|Error|SKIPPED|^deepspeed" | tail -25 ;;
    bench-d128)
      timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/attention.py --d 128 --out "$OUT/attention_d128.json" 2>&1 \
        | grep -v "^benchmark:" | tail -40 ;;
    bench-d64)
      timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/attention.py --d 64 --memory --cold-start \
        --out "$OUT/attention_d64.json" 2>&1 | grep -v "^benchmark:" | tail -40 ;;
    train)
      # TRAIN_VARIANTS="name=override,override name2= ...": one run of the phase per variant (its overrides, comma
      # separated, added to TRAIN_OVERRIDES; none after '='), each into training_<name>.json, under one time limit each
      if [ -n "${TRAIN_VARIANTS:-}" ]; then variants=($TRAIN_VARIANTS); else variants=("="); fi
      for variant in "${variants[@]}"; do
        name=${variant%%=*}; extra=${variant#*=}
        ovr=(); for o in ${TRAIN_OVERRIDES:-} ${extra//,/ }; do ovr+=(--override "$o"); done
        out=${name:+training_$name.json}
        [ -n "$name" ] && echo "-- variant $name: ${ovr[*]:-no overrides}"
        timeout "${TRAIN_TIMEOUT:-500}" python3 benchmarks/training_gpu.py --runs ${TRAIN_RUNS:-160m:2048 160m:8192 1.4b:8192} \
          --steps "${TRAIN_STEPS:-200}" --world-sizes ${TRAIN_WORLD:-1} --attention ${TRAIN_ATTENTION:-sigmoid softmax} \
          "${ovr[@]}" --out "$OUT/${out:-${TRAIN_OUT:-training_gpu.json}}" 2>&1 \
          | grep -v "it/s\]$" | tail -30
      done ;;
    train-real)
      timeout "${TRAIN_TIMEOUT:-500}" python3 benchmarks/training_gpu.py --runs ${REAL_RUNS:-160m:2048 1.4b:8192} \
        --mds "${REAL_MDS:-runs/demo/corpus}" --steps "${TRAIN_STEPS:-200}" --out "$OUT/training_real.json" 2>&1 \
        | grep -v "it/s\]$" | tail -30 ;;
    cp)
      timeout "${CP_TIMEOUT:-560}" python3 benchmarks/context_parallel.py --nproc "$(nvidia-smi -L | wc -l)" \
        --steps "${CP_STEPS:-10}" --warmup-steps 3 --profile-steps 2 --settings "${CP_SETTINGS:-preset}" ${CP_RUNS:+--runs $CP_RUNS} \
        --out "$OUT/context_parallel.json" 2>&1 | grep -E "^\|" | tail -24 ;;
    stability)
      S=${STAB_DIR:-docs/reproduce/stability-gpu}; n=$(basename "$S")
      rm -rf "$OUT/$n"; mkdir -p "$OUT/$n"; [ -d "$S" ] && cp -r "$S/." "$OUT/$n/"
      timeout "${STAB_TIMEOUT:-540}" python3 -m training.reproduce stability --scale gpu ${STAB_ARGS} --quiet \
        --out "$OUT/$n" 2>&1 | tail -12
      tar czf "$OUT/$n-arms.tgz" -C "$OUT/$n" arms && rm -rf "$OUT/$n/arms" ;;
    quality)
      # Each arm is packed into $OUT as soon as its trained.json (written last) appears, so the arms finished
      # before a call is cut off still come back (session 16 lost four when the call's limit hit the fourth).
      Q=${QUALITY_DIR:-runs/reproduce/quality-gpu}; mkdir -p /tmp/qpack
      # An arm whose values came out non-finite comes back as its failed.json and train.log (trained again next call).
      pack() { for arm in "$Q"/arms/*/; do a=$(basename "$arm")
        [ -f "$OUT/quality-$a.tgz" ] && continue
        if [ -f "$arm/trained.json" ]; then files=("$a/trained.json" "$a/train.log" "$a/embeddings")
          [ -f "$arm/run/metrics.jsonl" ] && files+=("$a/run/metrics.jsonl")    # per-step loss, tokens/s, MFU
        elif [ -f "$arm/failed.json" ]; then files=("$a/failed.json" "$a/train.log")
        else continue; fi
        tar czf "/tmp/qpack/$a.tgz" -C "$Q/arms" "${files[@]}" && mv "/tmp/qpack/$a.tgz" "$OUT/quality-$a.tgz"; done; }
      ( while sleep 5; do pack; done ) & packer=$!
      timeout "${QUALITY_TIMEOUT:-500}" python3 -m training.reproduce quality --scale gpu --stage device ${QUALITY_ARGS} \
        --out "$Q" 2>&1 | tee "$OUT/quality.log" | tail -5
      kill $packer 2>/dev/null; wait $packer 2>/dev/null; pack
      { cat "$OUT/header.txt" "$OUT/build.log" 2>/dev/null; cat "$OUT/quality.log"; } > /tmp/qpack/quality.log
      mv /tmp/qpack/quality.log "$OUT/quality.log"; rm -f "$OUT/build.log" ;;
    stress)
      timeout "${STRESS_TIMEOUT:-300}" python3 benchmarks/stress_attention.py --seconds "${STRESS_SECONDS:-20}" \
        --load "${STRESS_LOAD:-4}" ${STRESS_ARGS---fill-uninitialized} --out "$OUT/stress_attention.json" 2>&1 | tail -12 ;;
    configs)
      timeout "${CONFIGS_TIMEOUT:-400}" python3 benchmarks/attention_configs.py ${CONFIGS_ARGS:---d 64 --n 4096 8192 \
        --layout varlen --kinds bwd --tiles 64,128,8,3 64,64,8,3 32,64,8,3 32,128,8,3 32,256,8,3 32,256,16,3 \
        64,128,8,2 64,128,8,4} --out "$OUT/attention_configs.json" 2>&1 | tail -20 ;;
    speed)
      rm -rf /tmp/speed-gpu
      timeout "${SPEED_TIMEOUT:-540}" python3 -m training.reproduce speed --scale gpu ${SPEED_ARGS} --quiet \
        --out /tmp/speed-gpu 2>&1 | tail -8
      tar czf "$OUT/speed-gpu.tgz" -C /tmp speed-gpu ;;
    profile)
      timeout "${PROFILE_TIMEOUT:-400}" python3 benchmarks/training_profile.py --runs ${PROFILE_RUNS:-160m:2048 160m:8192 1.4b:8192} \
        $PROFILE_ARGS --out "$OUT/profile" 2>&1 | grep -E "^\||^copies" | tail -24 ;;
    project)
      timeout "${PROJECT_TIMEOUT:-500}" python3 -m launch.project --measure --sizes ${PROJECT_SIZES:-160m 400m 600m 1.4b} \
        --context 2048 4096 8192 --cells 131.6e6 --gpus 16 --out "$OUT/projection-measured" 2>&1 | tail -40 ;;
    *) echo "unknown phase $phase"; exit 2 ;;
  esac
  echo "== phase $phase: $(( $(date +%s) - t0 )) s"
  [ -n "${clocks_pid:-}" ] && python3 benchmarks/gpu_clocks.py "$CLOCKS_CSV" --since "$ts0" --until "$(date +%s.%N)" \
    --phase "$phase" --json "$OUT/clocks.jsonl"
done
