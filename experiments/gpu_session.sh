#!/usr/bin/env bash
# The GPU checks that issues 11 and 14 leave for a session lent a device machine, as prepared
# device calls. The device budget is about 15 minutes in all, a machine's start included, and
# one call may run 10, so the default call does the private-utility checks (about 6 minutes
# on an H200) and STEP=objective, a second call, trains what is left of the full objective
# study. Each step has its own time limit, so a slow step cannot eat the next one's time.
# The device tool returns at most 8 files from $OUT, two folders down: the studies write
# under /tmp and only the files worth committing are copied, flat, into $OUT.
#
# Prepare on this machine (both folders are kept out of git by .git/info/exclude):
#   echo /.whl/ >> .git/info/exclude; echo /.mnist/ >> .git/info/exclude
#   mkdir -p .mnist && cp ../shared/data/mnist/*.gz .mnist/
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       opacus==1.6.0 argparse-dataclass==2.0.0
# Then, through the device tool:
#   run(command="bash experiments/gpu_session.sh", carry=[".whl", ".mnist"], timeout_s=480)
#   run(command="STEP=objective ROWS=js,kl LIMIT=300 bash experiments/gpu_session.sh", carry=[...])
#   (LIMIT: the seconds the device budget has left for training and evaluating, less a margin)
# Rehearse on the CPU with tiny settings (what it writes goes under runs/):
#   DEVICE=cpu QUICK=1 OUT=runs/gpu_rehearsal bash experiments/gpu_session.sh
set -u
OUT=${OUT:-runs/gpu_session}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
STEP=${STEP:-private}
WORK=${WORK:-/tmp/gankit_gpu}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
LOG="$OUT/gpu_session.log"
if [ -d .whl ]; then
    # The device image has torch but neither opacus nor gankit: the carried wheels, then gankit
    # from this tree (its setuptools is on the image; no index, nothing fetched).
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl . --no-build-isolation >>"$LOG" 2>&1 \
        && export PYTHONPATH=/tmp/site || echo "== install failed" >>"$LOG"
fi
DATA=${DATA:-.mnist}
[ -d "$DATA" ] || DATA=../shared/data/mnist
step() {  # step NAME SECONDS COMMAND...: run it under its own limit, log how it ended
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s): $*" >>"$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" >>"$LOG" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s" >>"$LOG"
}
{ date; nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null; $PY -c \
  "import torch, opacus; print('torch', torch.__version__, 'opacus', opacus.__version__, 'cuda', torch.cuda.is_available())"; } >>"$LOG" 2>&1

if [ "$STEP" = private ]; then
    # Issue 11: D steps per second of the record's architecture at batch 128 (every clipping
    # mode checked on the CPU first), and the recipe's D step at its own batch.
    BENCH_STEPS=20; [ "$QUICK" = 1 ] && BENCH_STEPS=2
    step dp_step_record 120 $PY benchmarks/dp_step.py --model record --batch-size 128 \
        --device "$DEVICE" --steps $BENCH_STEPS --repeats 3
    step dp_step_recipe 90 $PY benchmarks/dp_step.py --model recipe --width 16 --batch-size 1024 \
        --modes bk --device "$DEVICE" --steps $BENCH_STEPS --repeats 3
    # The wall time of the whole recipe: the epsilon-10 60-epoch row with a third seed, trained
    # and evaluated on the GPU (its DP-SGD baseline is added later on the CPU: --no-baseline).
    ROW=eps10-dcgan-w16-b1024-proj-group-ms0.3-ac1-e60-seed3
    QUICK_SETS=(); [ "$QUICK" = 1 ] && QUICK_SETS=(--set epochs=1 --eval-set train_samples=500
        --eval-set val_samples=200 --eval-set metric_samples=500 --eval-set downstream_epochs=1)
    step dp_mnist 330 $PY experiments/dp_mnist.py --config experiments/configs/dp_mnist_cpu.json \
        --data-root "$DATA" --device "$DEVICE" --rows $ROW --out "$WORK/dp_mnist" --no-baseline \
        "${QUICK_SETS[@]}"
    for f in evaluations/$ROW.json histories/$ROW.jsonl samples/$ROW.png; do
        [ -f "$WORK/dp_mnist/$f" ] && cp "$WORK/dp_mnist/$f" "$OUT/"
    done
elif [ "$STEP" = objective ]; then
    # Issue 14: rows of the full objective study (20 epochs, width 64, all 60,000 images). Each
    # row's evaluation, history and grid come back to be committed under
    # experiments/results/objective_study_full/ (the study tables committed rows from them).
    ROWS=${ROWS:?name the rows, e.g. ROWS=js,kl}
    QUICK_SETS=(); [ "$QUICK" = 1 ] && QUICK_SETS=(--set epochs=1)
    step objective "${LIMIT:-500}" $PY experiments/objective_study.py \
        --config experiments/configs/objective_study_full.json --data-root "$DATA" \
        --device "$DEVICE" --rows "$ROWS" --sequential --out "$WORK/objective" "${QUICK_SETS[@]}"
    # Six files at most beside the log and the table: two rows' worth. (The committed bce and
    # wgan-gp rows predate the per-row evaluations: name them again to keep them in the table.)
    cp "$WORK/objective/table.md" "$OUT/" 2>/dev/null
    for row in $(echo "$ROWS" | tr , ' ' | cut -d' ' -f1-2); do
        for f in evaluations/$row.json histories/$row.jsonl samples/$row.png; do
            [ -f "$WORK/objective/$f" ] && cp "$WORK/objective/$f" "$OUT/${f%%/*}.$(basename "$f")"
        done
    done
else
    echo "unknown STEP=$STEP (private or objective)" >>"$LOG"
    exit 2
fi
date >>"$LOG"
