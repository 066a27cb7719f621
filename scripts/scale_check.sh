#!/usr/bin/env bash
# Frontend-worker scaling on a machine with many cores (issue 15): throughput of add_sub (tiny,
# frontend-bound) and mlp (a batched model) as --frontend-workers goes 0, 1, 2, 4, 8, each printed
# with its ratio to 0 workers (one process), plus the engine's and the workers' CPU per request.
#
#   scripts/scale_check.sh                 # add_sub c=64 and mlp c=64, 8 s a point
#   SECONDS_PER_POINT=15 WORKERS="0 2 4 8 12" scripts/scale_check.sh
#   CLIENTS=8 scripts/scale_check.sh       # load-generator processes (default: a quarter of the cores)
#   REPEAT=3 scripts/scale_check.sh        # every point 3 times in turns, the median printed
#
# The load generator (scripts/loadgen.py, closed-loop gRPC) runs on the same machine: give it enough
# processes that it is not the bottleneck (its own CPU shows in `top`). With perf_analyzer on PATH,
# PA=1 adds a perf_analyzer run per point against the same server for comparison.
# Target (issue 15): add_sub c=64 with 8 workers at least 6x the single-process throughput.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
CORES=$(nproc)
CLIENTS=${CLIENTS:-$(( CORES / 4 > 1 ? CORES / 4 : 1 ))}
WORKERS=${WORKERS:-"0 1 2 4 8"}
SECS=${SECONDS_PER_POINT:-8}
echo "# scale check: $CORES cores, $CLIENTS client processes, workers: $WORKERS"
if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L || true; fi
"$PY" scripts/bench_workers.py --seconds "$SECS" --warmup 2 --processes "$CLIENTS" --workers $WORKERS \
    --repeat "${REPEAT:-1}" \
    --scenario add_sub:64 --scenario mlp:64 | tee .cache/scale_check.md
if [ "${PA:-0}" = "1" ] && command -v perf_analyzer >/dev/null 2>&1; then
    for w in $WORKERS; do
        echo "## perf_analyzer, add_sub c=64, $w workers"
        port=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
        "$PY" -m server.cli --model-repository .cache/bench_repository --host 127.0.0.1 --grpc-port "$port" \
            --http-port 0 --allow-http false --allow-metrics false --frontend-workers "$w" \
            > ".cache/scale-pa-$w.log" 2>&1 &
        pid=$!
        for _ in $(seq 120); do
            "$PY" -c "import grpc,sys; grpc.channel_ready_future(grpc.insecure_channel('127.0.0.1:$port')).result(timeout=1)" \
                2>/dev/null && break
            sleep 1
        done
        perf_analyzer -m add_sub -u "127.0.0.1:$port" -i grpc --concurrency-range 64 \
            --measurement-interval $(( SECS * 1000 )) | grep -E "Throughput|p99" || true
        kill -TERM "$pid"; wait "$pid" || true
    done
fi
"$PY" - <<'PY'
import re
rows = {}
for line in open(".cache/scale_check.md"):
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) >= 5 and cells[0] in ("add_sub", "mlp") and cells[2].isdigit():
        rows[(cells[0], int(cells[2]))] = float(cells[3].replace(",", ""))
for model in ("add_sub", "mlp"):
    base = rows.get((model, 0))
    if base:
        print(model + ": " + ", ".join(f"{w} workers {rows[(m, w)] / base:.2f}x" for (m, w) in sorted(rows) if m == model))
if rows.get(("add_sub", 0)) and rows.get(("add_sub", 8)):
    ratio = rows[("add_sub", 8)] / rows[("add_sub", 0)]
    print(f"target: add_sub c=64, 8 workers >= 6x one process: {ratio:.2f}x -> {'met' if ratio >= 6 else 'NOT met'}")
PY
