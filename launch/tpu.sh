#!/usr/bin/env bash
# Run dapo-jax on a Cloud TPU VM, a queued resource or several slices (multi-slice), from your
# workstation, with gcloud. Every worker runs the same command (JAX's multi-controller runtime).
#
#   launch/tpu.sh [options] create   # a TPU VM; with --queued or --slices N a queued resource
#   launch/tpu.sh [options] setup    # copy this checkout (git HEAD) to every worker and install it
#   launch/tpu.sh [options] run [-- extra train flags]   # start training on every worker at once
#   launch/tpu.sh [options] logs     # stream a worker's log (--worker, default 0)
#   launch/tpu.sh [options] stop     # SIGTERM on every worker: finish the step, checkpoint, exit
#   launch/tpu.sh [options] delete   # delete the TPU VM / queued resource
#
# Options (each also read from the environment variable in brackets):
#   --name NAME          TPU VM / queued resource and node name (slices: <name>-<i>)   [TPU_NAME]
#   --zone ZONE          e.g. us-east5-a                                               [TPU_ZONE]
#   --project PROJECT    default: gcloud's configured project                          [TPU_PROJECT]
#   --accelerator TYPE   e.g. v5p-128, v4-32, v5litepod-16, v6e-8                      [TPU_ACCELERATOR]
#   --runtime VERSION    TPU software version (default: the one for the generation)    [TPU_RUNTIME]
#   --slices N           N slices of --accelerator over DCN (a queued resource)        [TPU_SLICES]
#   --queued             request a queued resource even for one slice                  [TPU_QUEUED=1]
#   --spot               spot capacity                                                 [TPU_SPOT=1]
#   --config FILE[:ARG]  the run config, relative to the checkout                      [DAPO_CONFIG]
#   --workdir DIR        the run's directory on each worker (process 0 writes metrics)  [DAPO_WORKDIR]
#   --checkpoints URI    shared checkpoint storage for all workers: gs://bucket/run     [DAPO_CHECKPOINTS]
#   --worker N           which worker `logs` streams                                   [TPU_WORKER]
#   --dry-run            print the commands instead of running them                    [DRY_RUN=1]
#
# Example (the paper's recipe on the slice `python -m dapo_jax.plan` recommends):
#   launch/tpu.sh --name dapo --zone us-east5-a --accelerator v5p-32 --queued create
#   launch/tpu.sh --name dapo --zone us-east5-a setup
#   launch/tpu.sh --name dapo --zone us-east5-a --config configs/dapo_qwen2_5_32b.py \
#       --workdir runs/dapo-32b --checkpoints gs://my-bucket/dapo-32b run
set -euo pipefail

name="${TPU_NAME:-}"
zone="${TPU_ZONE:-}"
project="${TPU_PROJECT:-}"
accelerator="${TPU_ACCELERATOR:-}"
runtime="${TPU_RUNTIME:-}"
slices="${TPU_SLICES:-1}"
queued="${TPU_QUEUED:-0}"
spot="${TPU_SPOT:-0}"
config="${DAPO_CONFIG:-}"
workdir="${DAPO_WORKDIR:-}"
checkpoints="${DAPO_CHECKPOINTS:-}"
worker="${TPU_WORKER:-0}"
dry_run="${DRY_RUN:-0}"
remote_dir="dapo-jax"  # the checkout on each worker, under the login user's home
remote_log="dapo-jax.log"
megascale_port=8080

die() {
  echo "launch/tpu.sh: $*" >&2
  exit 2
}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

command=""
extra_flags=()
while (($#)); do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --accelerator) accelerator="$2"; shift 2 ;;
    --runtime) runtime="$2"; shift 2 ;;
    --slices) slices="$2"; shift 2 ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --checkpoints) checkpoints="$2"; shift 2 ;;
    --worker) worker="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra_flags=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *)
      [[ -z "$command" ]] || die "one command at a time (got '$command' and '$1')"
      command="$1"; shift ;;
  esac
done

[[ -n "$command" ]] || { usage; exit 2; }
[[ -n "$name" ]] || die "--name (or TPU_NAME) is required"
[[ -n "$zone" ]] || die "--zone (or TPU_ZONE) is required"
[[ "$slices" =~ ^[1-9][0-9]*$ ]] || die "--slices must be a positive integer, got '$slices'"
((slices > 1)) && queued=1  # several slices are requested together, as one queued resource

# One argument as the shell reads it back: bare when safe, else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Print a command as one line that a shell runs as it is.
print_command() {
  local line="" arg
  for arg in "$@"; do line+="${line:+ }$(quote "$arg")"; done
  printf '%s\n' "$line"
}

# Every gcloud call goes through here: printed under --dry-run, else run.
gcloud_cmd() {
  local args=("$@")
  if [[ -n "$project" ]]; then args+=("--project=$project"); fi
  if [[ "$dry_run" == 1 ]]; then
    print_command gcloud "${args[@]}"
  else
    gcloud "${args[@]}"
  fi
}

# The TPU VM names, as create makes them: one slice (a TPU VM, or a queued resource's --node-id) is
# <name>; several slices are the queued resource's --node-prefix nodes <name>-0 ... <name>-<slices-1>.
nodes() {
  if ((slices > 1)); then
    local i
    for ((i = 0; i < slices; i++)); do echo "$name-$i"; done
  else
    echo "$name"
  fi
}

default_runtime() {
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "no default runtime for accelerator '$1'; pass --runtime" ;;
  esac
}

create() {
  [[ -n "$accelerator" ]] || die "create needs --accelerator (e.g. v5p-128)"
  [[ "$accelerator" =~ ^(v4|v5p|v5litepod|v5e|v6e)-[0-9]+$ ]] \
    || die "--accelerator '$accelerator' is not a TPU type like v5p-128, v4-32, v5litepod-16, v6e-8"
  local version="${runtime:-$(default_runtime "$accelerator")}"
  local capacity=()
  [[ "$spot" == 1 ]] && capacity=(--spot)
  if [[ "$queued" == 1 ]]; then
    local placement=(--node-id="$name")
    ((slices > 1)) && placement=(--node-count="$slices" --node-prefix="$name")
    gcloud_cmd compute tpus queued-resources create "$name" --zone="$zone" --accelerator-type="$accelerator" \
      --runtime-version="$version" "${placement[@]}" "${capacity[@]}"
  else
    gcloud_cmd compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accelerator" \
      --version="$version" "${capacity[@]}"
  fi
}

# Run a shell command on every worker of every node at once.
on_all_workers() {
  local node
  for node in $(nodes); do
    gcloud_cmd compute tpus tpu-vm ssh "$node" --zone="$zone" --worker=all --command="$1"
  done
}

setup() {
  local here archive
  here="$(cd "$(dirname "$0")/.." && pwd)"
  archive="${TMPDIR:-/tmp}/dapo-jax-$(git -C "$here" rev-parse --short HEAD).tar.gz"
  if [[ "$dry_run" == 1 ]]; then
    print_command git -C "$here" archive --format=tar.gz -o "$archive" HEAD
  else
    git -C "$here" archive --format=tar.gz -o "$archive" HEAD
  fi
  local node
  for node in $(nodes); do
    gcloud_cmd compute tpus tpu-vm scp "$archive" "$node:dapo-jax.tar.gz" --zone="$zone" --worker=all
  done
  on_all_workers "set -e; rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf dapo-jax.tar.gz -C $remote_dir \
&& cd $remote_dir && python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[tpu]'"
}

run() {
  [[ -n "$config" ]] || die "run needs --config (e.g. configs/dapo_qwen2_5_32b.py)"
  [[ -n "$workdir" ]] || die "run needs --workdir (a directory on each worker, e.g. runs/dapo-32b)"
  [[ -n "$checkpoints" ]] || die "run needs --checkpoints, storage every worker shares (gs://bucket/run): \
each host writes its own shards of every checkpoint"
  local train
  train="python -m dapo_jax.train --distributed $(quote "--config=$config") $(quote "--workdir=$workdir")"
  train+=" $(quote "--config.checkpoint.dir=$checkpoints")"
  local flag
  for flag in "${extra_flags[@]}"; do train+=" $(quote "$flag")"; done
  local coordinator_ip=""
  if ((slices > 1)); then
    # Multi-slice: the slices find each other through slice 0's worker 0, over DCN.
    local describe=(compute tpus tpu-vm describe "$name-0" --zone="$zone"
      --format="value(networkEndpoints[0].ipAddress)")
    if [[ "$dry_run" == 1 ]]; then
      gcloud_cmd "${describe[@]}"
      # shellcheck disable=SC2016  # a placeholder, printed as it is
      coordinator_ip='$COORDINATOR_IP'
      echo "(dry run: \$COORDINATOR_IP stands for the address the describe command prints)" >&2
    else
      coordinator_ip="$(gcloud_cmd "${describe[@]}")"
    fi
  fi
  local i=0 node env=""
  for node in $(nodes); do
    if ((slices > 1)); then
      env="MEGASCALE_COORDINATOR_ADDRESS=$coordinator_ip:$megascale_port MEGASCALE_NUM_SLICES=$slices \
MEGASCALE_SLICE_ID=$i MEGASCALE_PORT=$megascale_port "
    fi
    gcloud_cmd compute tpus tpu-vm ssh "$node" --zone="$zone" --worker=all \
      --command="cd $remote_dir && . .venv/bin/activate && ${env}nohup $train > ~/$remote_log 2>&1 < /dev/null &"
    i=$((i + 1))
  done
}

logs() {
  local node
  node="$(nodes | head -n 1)"
  gcloud_cmd compute tpus tpu-vm ssh "$node" --zone="$zone" --worker="$worker" --command="tail -n +1 -F ~/$remote_log"
}

stop() {
  # The train loop catches SIGTERM, finishes the step, agrees with the other hosts, saves and exits.
  # ([p]ython: the pattern does not match the remote shell that runs pkill.)
  on_all_workers "pkill -TERM -f '[p]ython -m dapo_jax.train' || true"
}

delete() {
  if [[ "$queued" == 1 ]]; then
    gcloud_cmd compute tpus queued-resources delete "$name" --zone="$zone" --force --quiet
  else
    gcloud_cmd compute tpus tpu-vm delete "$name" --zone="$zone" --quiet
  fi
}

case "$command" in
  create | setup | run | logs | stop | delete) "$command" ;;
  *) die "unknown command '$command': use create, setup, run, logs, stop or delete" ;;
esac
