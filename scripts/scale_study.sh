#!/usr/bin/env bash
# The scale study of docs/scale.md, every sweep in full (the doc's Commands section abbreviates
# them), then the doc's tables from the JSON (scripts/scale_tables.py). ~35 min in one process
# here; nohup-able: `nohup scripts/scale_study.sh > study.log &`. STUDY=nfp,alpha,... runs only
# those sweeps (default: all); EMNIST=... and PYTHON=... the CLI and interpreter to use.
set -euo pipefail
cd "$(dirname "$0")/.."
EMNIST=${EMNIST:-.venv/bin/emnist}
PYTHON=${PYTHON:-.venv/bin/python}
STUDY=${STUDY:-nfp,alpha,batch,store,update,study,local,p2p-mlp,p2p-lenet5}
C=(--model mlp --dataset fashion-mnist --target-accuracy 0.85 --eval-samples 2000 --samples 720000)
C1M=("${C[@]}" --set max_events=1000000)
W_ALL=1,2,4,8,16,32,64,128,256,512,1024
batches() {  # --variant bsN:batch_size=N[,extra] for the study's batch sizes
  local b; for b in 16 32 64 128; do echo "--variant bs$b:batch_size=$b${1:+,$1}"; done
}

sweep() {  # name, then the sweep's own options
  local name=$1; shift
  [[ ",$STUDY," == *",$name,"* ]] || return 0
  echo "== $name ($(date -u +%H:%M:%S))"
  "$EMNIST" sim sweep "$@" --json "results/sim-sweep-$name.json" \
    --table "results/sim-sweep-$name.md" --plot "docs/img/scale-$name.png"
}

sweep nfp "${C[@]}" --set max_events=3000000 --costs cluster10 --scale $W_ALL \
  --variant n1:n_fetch=1,n_push=1 --variant n10:n_fetch=10,n_push=10 \
  --variant n100:n_fetch=100,n_push=100
sweep alpha "${C1M[@]}" --costs cluster10 --scale $W_ALL \
  --variant n10-linear:alpha_scaling=linear --variant n10-sqrt:alpha_scaling=sqrt \
  --variant n100-linear:n_fetch=100,n_push=100,alpha_scaling=linear
# shellcheck disable=SC2046  # batches prints whole words
sweep batch "${C1M[@]}" --costs cluster10 --scale 1,4,16,64,256,1024 $(batches alpha_scaling=linear)
sweep store "${C1M[@]}" --costs cluster10 --scale 1,4,16,64,256 \
  --n-fetch 1 --n-push 1 --chunk-bytes 32768 --variant 1server:servers=1 \
  --variant 4servers:servers=4 --variant 16servers:servers=16 --variant tiered:tiered=true
sweep update "${C1M[@]}" --costs cluster10 --scale 1,4,16,64,256 \
  --n-fetch 1 --n-push 1 --variant atomic:update=atomic --variant overwrite:update=overwrite
# shellcheck disable=SC2046
sweep study "${C1M[@]}" --costs study3 --scale 3 --n-fetch 10 --n-push 1 --update overwrite $(batches)
sweep local "${C1M[@]}" --costs local --scale 1,2 --variant bs32:batch_size=32 --variant bs128:batch_size=128
K=(--variant alone:serverless=false)
for k in 1 2 4 8 16 32 64; do K+=(--variant "k$k:serverless=true,grad_parallel=$k"); done
P=(--algorithm p2p --target-accuracy 0.99 --batch-size 50 --sync-every 64 --costs lambda --scale 3)
sweep p2p-mlp --model mlp "${P[@]}" --set iterations=2 "${K[@]}"
sweep p2p-lenet5 --model lenet5 "${P[@]}" --set iterations=1 "${K[@]}"
"$PYTHON" scripts/scale_tables.py  # the doc's tables from the JSON
echo "== done ($(date -u +%H:%M:%S))"
