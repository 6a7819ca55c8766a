#!/usr/bin/env bash
# N processes of one multi-host job on this machine, joined on 127.0.0.1: the way to try
# multi-host runs (and what the tests run) without a cluster.
#
#   launch/local.sh N [transvw_jax.main arguments...]
#   launch/local.sh 2 --config configs/demo.py:runlocal --workdir runs/two
#   XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \
#     launch/local.sh 2 --config configs/demo.py:runlocal --workdir runs/two   # 2 x 2 CPU devices
#
# Like the pod and SLURM launchers, it starts the SAME command in every process; each gets
# its process id, the process count and process 0's address through explicit-mode flags
# (config.parallel.distributed=explicit), on a free port (or PORT=...). The processes'
# output is interleaved, each line prefixed with "[p<id>]". Nothing here stops the other
# processes when one fails: as on a pod, each process notices a lost peer itself
# (config.parallel.heartbeat_timeout_s) and stops with a line naming it. Ctrl-C (or a
# SIGTERM to this script) is passed on to every process as SIGTERM: they save a
# checkpoint and stop (exit 143), and this script waits for them.
# Exit status: 0 when every process succeeded, else the first non-zero status by process id.
# PYTHON (default python3) selects the interpreter; the process ids and PIDs are printed
# to stderr as "local.sh: process <id> pid <pid>".
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
N=$1
shift
PYTHON="${PYTHON:-python3}"
PORT="${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

pids=()
# Ctrl-C or SIGTERM: pass SIGTERM on and keep waiting. Each process then saves a checkpoint
# at a step all of them agree on and exits 143 ("preempted: ..."), as on a preempted pod.
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap stop_all INT TERM

for ((i = 0; i < N; i++)); do
  # exec: the process id printed is python's own, so a signal to it reaches the process.
  (exec "$PYTHON" -u -m transvw_jax.main "$@" \
     --config.parallel.distributed=explicit \
     --config.parallel.coordinator_address="127.0.0.1:$PORT" \
     --config.parallel.num_processes="$N" \
     --config.parallel.process_id="$i") \
    > >(sed -u "s/^/[p$i] /") 2> >(sed -u "s/^/[p$i] /" >&2) &
  pids+=($!)
  echo "local.sh: process $i pid ${pids[$i]}" >&2
done

status=0
for ((i = 0; i < N; i++)); do
  while :; do
    rc=0
    wait "${pids[$i]}" || rc=$?
    # A trapped signal ends `wait` early: wait again while the process is still there.
    kill -0 "${pids[$i]}" 2>/dev/null || break
  done
  if ((rc != 0 && status == 0)); then
    status=$rc
  fi
done
exit "$status"
