#!/usr/bin/env bash
# Every CUDA path of the project on one GPU, with logs: the CUDA tests, the benchmarks of every step (bf16, fp16 with
# a GradScaler, compiled and not), the memory model against max_memory_allocated, and a short torchrun pre-training
# at S size on generated tar shards (eager, then compiled) followed by a DiT on its latents.
#
#   bash scripts/cuda_check.sh tests|memory|bench|compile|run|all  # logs and summary.txt in $OUT (default runs/cuda_check)
#   ONLY='s1_B|dit_XL' bash scripts/cuda_check.sh bench          # only the benchmarks whose name matches
#
# Numbers from this script are in the README's performance section. Each command has its own time limit (T seconds).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-runs/cuda_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
T=${T:-400}

bench() {  # bench NAME ARGS...: one benchmark; on out-of-memory, again with half the stage-1 batches
  local name=$1; shift
  [[ -n "${ONLY:-}" && ! $name =~ $ONLY ]] && return  # ONLY=REGEX runs the matching benchmarks only
  echo "=== $name: $*"
  timeout "$T" $py scripts/benchmark.py "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local half  # stage 1: B, B_ssl, B_rec of the presets (512, 128, 64), halved until the step fits
  for half in 256 128; do
    grep -q "OutOfMemoryError" "$out/$name.log" || break
    echo "    out of memory; B=$half"
    timeout "$T" $py scripts/benchmark.py "$@" --data.batch_size=$half --data.ssl_batch_size=$((half / 4)) \
      --data.rec_batch_size=$((half / 8)) > "$out/$name.log" 2>&1
    rc=$?
  done
  grep -v "LPIPS disabled" "$out/$name.log" | tail -n 40
  echo "    rc=$rc"
  { echo "## $name (rc=$rc): $*"; grep -E "ms/step|MFU|^batch|graphs|host syncs" "$out/$name.log"; } >> "$out/summary.txt"
}

part_tests() {
  echo "=== tests"
  $py -m pytest -q tests/test_cuda.py tests/test_benchmark.py 2>&1 | tail -n 15
}

part_bench() {
  bench s1_S_bf16 --preset=S --run.amp=bf16 --check
  bench s1_B_bf16 --preset=B --run.amp=bf16 --check
  bench s1_S_fp16 --preset=S --run.amp=fp16
  bench s2_B_bf16 --what=stage2 --preset=B --batch=64 --run.amp=bf16 --lpips
  bench s2_B_fp16 --what=stage2 --preset=B --batch=64 --run.amp=fp16 --lpips
  bench dit_B_bf16 --what=dit --preset=B --dit_model=B --batch=256 --run.amp=bf16
  bench dit_XL_bf16 --what=dit --preset=B --dit_model=XL --batch=64 --run.amp=bf16 --check
  bench dit_XL_fp16 --what=dit --preset=B --dit_model=XL --batch=64 --run.amp=fp16 --steps=5
  bench sample_B --what=sample --preset=B --dit_model=B --batch=128 --steps=1 --warmup=1
  bench sample_XL --what=sample --preset=B --dit_model=XL --batch=128 --steps=1 --warmup=0
  bench fid --what=fid --batch=250 --run.amp=fp32
  # exact gradient accumulation: 4 micro-batches of 128 with cached CLIP gradients against one batch of 512
  bench s1_S_accum4 --preset=S --run.amp=bf16 --data.batch_size=128 --data.ssl_batch_size=32 \
    --data.rec_batch_size=16 --train.accum_steps=4
  bench s1_S_512 --preset=S --run.amp=bf16 --data.batch_size=512 --data.ssl_batch_size=128 --data.rec_batch_size=64
}

part_compile() {
  bench s1_B_bf16_compile --preset=B --run.amp=bf16 --compile --check --data.batch_size=128 \
    --data.ssl_batch_size=32 --data.rec_batch_size=16
  bench dit_XL_bf16_compile --what=dit --preset=B --dit_model=XL --batch=128 --run.amp=bf16 --compile --check
  bench s1_S_bf16_compile --preset=S --run.amp=bf16 --compile
  bench sample_XL_compile --what=sample --preset=B --dit_model=XL --batch=256 --steps=1 --warmup=1 --compile
}

part_memory() {  # the memory model's table next to max_memory_allocated of real steps at the shipped batches
  echo "=== memory"
  timeout "$T" $py scripts/benchmark.py --memory > "$out/memory.log" 2>&1
  timeout "$T" $py scripts/benchmark.py --memory --paper_batch --gpus=8 >> "$out/memory.log" 2>&1
  echo "    rc=$?"; tail -n 30 "$out/memory.log"
  { echo "## memory"; cat "$out/memory.log"; } >> "$out/summary.txt"
}

part_run() {  # the command users run: torchrun stage 1 at S on tar shards, eager then compiled; a DiT on its latents
  local shards=$out/shards steps=${STEPS:-60}
  echo "=== shards"
  $py scripts/preview_data.py --out="$out" --shards=16 --per_shard=256 --encoder.image_size=256 > /dev/null
  # no CLIP merges file or LPIPS weights on the device: the logged opt-outs (a BPE of 1024 ids: quick to train)
  local common=(--preset=S --text.tokenizer=bpe --text.vocab_size=1024 --loss.lpips=off --data.dataset=tar
    "--data.path=$shards/{00000..00015}.tar" --data.holdout=256 --train.max_steps="$steps" --train.log_every=10
    --train.ckpt_every="$steps" --train.preview_every="$steps")
  for mode in eager compiled; do
    local flag=(); [[ $mode == compiled ]] && flag=(--run.compile=true)
    echo "=== torchrun pretrain S ($mode)"
    TORCH_LOGS=recompiles timeout "$T" torchrun --standalone --nproc_per_node=1 pretrain.py "${common[@]}" "${flag[@]}" \
      --train.out_dir="$out/pretrain_S_$mode" > "$out/pretrain_S_$mode.log" 2>&1
    echo "    rc=$?"; grep -E "^step|Error|error" "$out/pretrain_S_$mode.log" | tail -n 8
    echo "    recompilations: $(grep -c "Recompiling function" "$out/pretrain_S_$mode.log")"
    { echo "## pretrain_S_$mode"; grep -E "^step" "$out/pretrain_S_$mode.log" | tail -n 3; } >> "$out/summary.txt"
  done
  echo "=== DiT-B on its latents"
  timeout "$T" $py train_dit.py --tokenizer="$out/pretrain_S_compiled" --dit.model=B --dit.out_dir="$out/dit_B" \
    --dit.num_cache_images=2000 --dit.stats_images=2000 \
    --dit.batch_size=256 --dit.max_steps=200 --dit.log_every=50 --dit.ckpt_every=200 --dit.sample_every=200 \
    --sample.num_steps=50 --run.compile=true > "$out/dit_B.log" 2>&1
  echo "    rc=$?"; grep -E "^step|wrote|Error|error|DiT-" "$out/dit_B.log" | tail -n 12
  rm -f "$out"/pretrain_S_*/ckpt_*.pt "$out"/dit_B/ckpt_*.pt  # keep logs and PNGs, not the weights
  rm -rf "$out"/dit_B/latents* "$shards"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
case "${1:-all}" in
  tests) part_tests ;;
  bench) part_bench ;;
  compile) part_compile ;;
  memory) part_memory ;;
  run) part_run ;;
  all) part_tests; part_memory; part_bench; part_compile; part_run ;;
esac
echo "=== summary"; cat "$out/summary.txt" 2>/dev/null
