#!/usr/bin/env bash
# add_sub through perf_analyzer (Triton's C++ load generator, lighter than the Python client):
# inferd, KServe and MLServer, one after another on this machine, concurrency 1 and 16.
#   scripts/bench_pa.sh            (needs root for the perf_analyzer chroot; peers: scripts/peers/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
$PY scripts/build_models.py --bench .cache/bench_repository >/dev/null
MODEL=.cache/bench_repository/add_sub/1/model.onnx
port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() { for _ in $(seq 120); do (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.5; done; echo "no server on $1"; exit 1; }
measure() { # name port shape-args...
  local name=$1 p=$2; shift 2
  sleep 3
  scripts/perf_analyzer.sh -m add_sub -i grpc -u 127.0.0.1:$p --concurrency-range 1:16:15 \
      --measurement-interval 4000 -s 50 --max-trials 20 "$@" 2>&1 | awk -v n="$name" '/Request concurrency/{c=$3} /Throughput/{t=$2} /p50 latency/{print "| " n " | " c " | " t " | " $3/1000 " |"}'
}
echo "| server | concurrency | inferences/s | p50 ms |"
echo "|---|---|---|---|"
G=$(port)
$PY -m server.cli --model-repository .cache/bench_repository --host 127.0.0.1 --grpc-port $G --allow-http false --allow-metrics false > .cache/pa-inferd.log 2>&1 &
S=$!; wait_up $G; measure inferd $G; kill $S; wait $S || true
for peer in kserve mlserver; do
  G=$(port)
  .bench/$peer-venv/bin/python scripts/peers/${peer}_onnx.py --model_name add_sub --model_file $MODEL \
      --http_port $(port) --grpc_port $G --triton_model_config > .cache/pa-$peer.log 2>&1 &
  S=$!; wait_up $G; measure $peer $G --shape INPUT0:1,16 --shape INPUT1:1,16; kill $S; wait $S || true
done
