#!/usr/bin/env bash
# `make demo`: the whole product in a few minutes on a laptop. Generate a log, train HoME,
# write its evaluation report, export and register it, promote it, serve it, rank one real
# user's candidates over HTTP, stop the service. Everything lands in the working directory
# (data/, mlflow.db, mlruns/, checkpoints/, reports/, exports/).
set -euo pipefail
BIN=${BIN:-.venv/bin}
ROWS=${DEMO_ROWS:-200000}
EPOCHS=${DEMO_EPOCHS:-2}
PORT=${DEMO_PORT:-8765}
NAME=ranker-demo
step() { printf '\n== %s\n' "$*"; }

step "1/6 generate a behaviour log ($ROWS impressions)"
"$BIN/ranker" synth --out data/synthetic --rows "$ROWS" | tail -n 3

step "2/6 train HoME ($EPOCHS epochs), tracked in MLflow"
"$BIN/ranker" fit --config configs/trainer.yaml --config configs/model/home.yaml \
  --data.dataset configs/data/synthetic.yaml --data.log_path data/synthetic \
  --trainer.max_epochs "$EPOCHS" \
  --trainer.logger.init_args.experiment_name demo --trainer.enable_progress_bar false \
  | tee .demo-fit.log | grep -E "parameters\) on|│ mean|chosen on|calibration"
RUN=$(grep -oE "MLflow run [0-9a-f]{32}" .demo-fit.log | head -n 1 | cut -d' ' -f3)
rm -f .demo-fit.log

step "3/6 evaluate run $RUN on test: per-task metrics, expert health, report"
"$BIN/ranker" evaluate --run "$RUN" --out reports/demo | tail -n 2

step "4/6 export to ONNX (parity-checked), register, promote to @champion"
"$BIN/ranker" export --run "$RUN" --name "$NAME" | tail -n 2
"$BIN/ranker" promote --name "$NAME" --alias champion

step "5/6 serve models:/$NAME@champion on 127.0.0.1:$PORT"
"$BIN/ranker" serve --model "models:/$NAME@champion" --port "$PORT" --weights '{"click": 1, "like": 4}' &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$PORT/readyz" > /dev/null && break
  sleep 0.5
done

step "6/6 rank 5 candidates for a real user of the log"
REQUEST=$("$BIN/python" - <<'EOF'
import json
import polars as pl
log = pl.scan_parquet("data/synthetic", hive_partitioning=True)
user = log.select("user_id").head(1).collect().item()
items = log.select("item_id").unique(maintain_order=True).head(5).collect()["item_id"].to_list()
print(json.dumps({"user": {"id": user}, "candidates": [{"id": i} for i in items]}))
EOF
)
echo "POST /v1/rank $REQUEST"
ANSWER=$(curl -sf -X POST "http://127.0.0.1:$PORT/v1/rank" -H 'content-type: application/json' \
  -d "$REQUEST")
ANSWER=$ANSWER "$BIN/python" - <<'EOF'
import json
import os

answer = json.loads(os.environ["ANSWER"])
print("model:", answer["model"])
for c in answer["candidates"]:
    top = sorted(c["probabilities"].items(), key=lambda kv: -kv[1])[:3]
    shown = "  ".join(f"{task} {p:.3f}" for task, p in top)
    print(f"  item {c['id']:>6}  score {c['score']:.4f}  {shown}")
EOF
step "done: the report is reports/demo/report.html; browse runs with $BIN/mlflow ui --backend-store-uri sqlite:///mlflow.db"
