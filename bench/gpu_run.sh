#!/usr/bin/env bash
# The scoring-speed measurements (issue "Speed") in one run on a GPU machine, each step with its
# own timeout, each writing JSON and a log under $OUT; prints each step's table. Each step is
# `python -m bench.<name>`, run from the repository root.
#
# Here, once:  ../shared/tools/gpu-wheels --anomalib .whl      (ray 2.60 + anomalib, git-ignored)
#              and the fast decoders for its Python 3.12 (else Pillow decodes there):
#              pip download --only-binary=:all: --python-version 3.12 --no-deps -d .whl \
#                  pyspng simplejpeg
# There:       bash bench/gpu_run.sh                             (with .whl carried)
# Dry run on CPU at tiny sizes:  SMOKE=1 OUT=/tmp/gpu-dry bash bench/gpu_run.sh
# Some steps only:  STEPS="score_throughput vs_anomalib" VS_ARGS="--detectors patchcore" bash ...
# The step limits add up to more than one device call (600 s) and a session's 15 minutes with
# the machine's start: first STEPS="gpu_tests score_throughput vs_anomalib" (at most 520 s),
# then, if time is left, STEPS="ceilings train_input knn_products" or "tiled train_layouts".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import ray" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} ANOMALY_OFFLINE=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 \
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_DATA_DISABLE_PROGRESS_BARS=1
py=${PYTHON:-python3}
if [ -n "${SMOKE:-}" ]; then
    ceil=(--smoke); score=(--smoke); vs=(--smoke --precisions fp32,fp16 --profile)
    train=(--input-pipelines --images 16 --source-size 96 --image-size 64 --batch-size 4 --epochs 1)
    tiled=(--smoke)
    layouts=(--layouts --detector stpm --image-size 32 --batch-size 2 --steps 1 --rounds 1)
    knn=(--smoke)
    cpu=(--smoke)
else
    ceil=(--images 1000 --source-size 512 --seconds 2)
    # 24,000: the 2026-11-30 run of 8,000 spent 18 of its 29 s before the first part file
    score=(--images 24000 --source-size 512 --detector patchcore --set image_size=224 --num-actors 1
           --batch-size 64 --use-gpu)
    vs=(--train 64 --test 64 --seconds 2 --rounds 5 --timeout 60 --profile)
    train=(--input-pipelines --detector stpm --images 2048 --source-size 512 --image-size 256
           --batch-size 32 --epochs 2 --use-gpu)
    tiled=(--size 4096 --tile 256 --images 4 --fit-images 2)  # 256 tiles an image, defaults
    layouts=(--layouts --device cuda --precision bf16 --image-size 256 --batch-size 32 --steps 5
             --rounds 3)
    knn=(--rounds 3)  # PatchCore at defaults: float32 against bf16 products, scores compared
    cpu=(--images 800)  # core-ms per image of the CPU stages on this node's 16 cores
fi
steps=" ${STEPS:-cpu_per_image ceilings score_throughput score_resize vs_anomalib train_input tiled train_layouts knn_products} "  # STEPS=...: fewer
step() {  # name timeout command...  (9 steps: a log and a JSON each, 18 files back in all)
    local name=$1 limit=$2
    shift 2
    [[ $steps == *" $name "* ]] || return 0
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name: exit $? in $((SECONDS - start)) s"
    grep -v -i "warn" "$OUT/$name.log" | tail -22
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$py" -c "import torch, os; print('torch', torch.__version__, torch.cuda.is_available(), os.cpu_count(), 'cpus')"
if [[ $steps == *" gpu_tests "* || -z "${STEPS:-}" ]]; then  # the GPU-only tests, output here only
    echo "== gpu_tests"; timeout 120 "$py" -m pytest -q -x -p no:cacheprovider tests/unit/test_scoring.py 2>&1 | tail -4
fi
step ceilings 120 "$py" -m bench.ceilings "${ceil[@]}" --out "$OUT/ceilings.json"
step score_throughput 170 "$py" -m bench.score_throughput "${score[@]}" --out "$OUT/score_throughput.json"
step score_resize 170 "$py" -m bench.score_throughput "${score[@]}" --extra=--resize-on-device \
    --out "$OUT/score_resize.json"
step cpu_per_image 150 "$py" -m bench.cpu_per_image "${cpu[@]}" --out "$OUT/cpu_per_image.json"
step vs_anomalib 230 "$py" -m bench.vs_anomalib "${vs[@]}" --out "$OUT/vs_anomalib.json" ${VS_ARGS:-}
step train_input 100 "$py" -m bench.train_throughput "${train[@]}"
step tiled 120 "$py" -m bench.tiled_throughput "${tiled[@]}" --out "$OUT/tiled_throughput.json"
step train_layouts 90 "$py" -m bench.train_throughput "${layouts[@]}" --out "$OUT/train_layouts.json"
step knn_products 60 "$py" -m bench.knn_products "${knn[@]}" --out "$OUT/knn_products.json"
