# shellcheck shell=bash disable=SC2034  # variables here are used by the sourcing scripts
# Shared by the launch/ scripts (sourced, not run): flags every script takes, printing and
# running commands (--dry_run only prints), and the gcloud/kubectl argument lists.
# Needs bash >= 4.4 (empty arrays under `set -u`); on macOS: brew install bash.

set -euo pipefail

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$LAUNCH_DIR")"
REMOTE_DIR=mobilemoe-jax   # the project on each worker, relative to the ssh user's home

# XLA flags for TPU training: overlap the FSDP all-gathers and gradient reductions with
# compute (the async collective fusion flags MaxText sets on v5e/v6e). Not tuned for this
# model; replace with --libtpu_args='...' or an exported LIBTPU_INIT_ARGS.
DEFAULT_LIBTPU_ARGS="--xla_tpu_enable_async_collective_fusion=true \
--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_enable_async_collective_fusion_multiple_steps=true \
--xla_tpu_overlap_compute_collective_tc=true \
--xla_enable_async_all_gather=true"

NAME="" ZONE="" PROJECT="" DRY_RUN=0
EXTRA=()   # everything after `--`: extra trainer flags

die() {
  echo "error: $*" >&2
  echo "run '$0 --help' for the flags" >&2
  exit 2
}

usage() {  # prints the script's leading comment block (its documentation)
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
  exit "${1:-0}"
}

# Consumes one flag every script shares; returns 1 if $1 is not one of them.
common_flag() {
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    -h | --help) usage 0 ;;
    *) return 1 ;;
  esac
}

# require VALUE FLAG WHAT: fails with the flag's name when VALUE is empty.
require() {
  [[ -n "$1" ]] || die "missing required $2 ($3)"
}

# Shell-quotes words so a printed command can be pasted back (or sent over ssh) as is.
quote() {
  local out=() w
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$w")
    else
      out+=("'${w//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

# Prints a command as `+ cmd` and runs it; with --dry_run it is only printed (on stdout,
# one line per command, so tests and people can read exactly what would run).
run() {
  if ((DRY_RUN)); then
    echo "+ $(quote "$@")"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

# --zone/--project for gcloud; a missing --project falls back to gcloud's configured one.
gcloud_location() {
  LOCATION=("--zone=$ZONE")
  if [[ -n "$PROJECT" ]]; then LOCATION+=("--project=$PROJECT"); fi
}

# tpu_ssh WORKER COMMAND: runs a shell command line on one worker (0, 1, ...) or all.
tpu_ssh() {
  gcloud_location
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" "--worker=$1" "--command=$2"
}

# The runtime image for an accelerator type (gcloud --version / --runtime-version).
runtime_version() {
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v4-* | v3-* | v2-*) echo tpu-ubuntu2204-base ;;
    *) die "no default runtime version for --type=$1; pass --version" ;;
  esac
}
