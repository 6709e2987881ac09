#!/usr/bin/env bash
# Creates a TPU VM slice, directly or through a queued resource (waits until it is ACTIVE).
#
#   launch/create.sh --name=NAME --zone=ZONE --type=v5litepod-16 [--project=P]
#                    [--version=RUNTIME] [--queued] [--spot] [--dry_run]
#
# --type     accelerator type (v5litepod-16, v6e-32, v5p-64, v4-32, ...)
# --version  TPU runtime image; default from --type (v2-alpha-tpuv5-lite, ...)
# --queued   ask through a queued resource named NAME (node NAME): it waits for capacity,
#            and after a preemption it is deleted and created again (see launch/README.md)
# --spot     spot capacity: cheaper, preemptible at any time

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

TYPE="" VERSION="" QUEUED=0 SPOT=0
while (($#)); do
  common_flag "$1" || case "$1" in
    --type=*) TYPE="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    *) die "unknown argument: $1" ;;
  esac
  shift
done
require "$NAME" --name "the TPU VM name"
require "$ZONE" --zone "e.g. us-east5-b"
require "$TYPE" --type "the accelerator type, e.g. v5litepod-16"
VERSION="${VERSION:-$(runtime_version "$TYPE")}"
gcloud_location
capacity=()
if ((SPOT)); then capacity+=(--spot); fi

if ((QUEUED)); then
  run gcloud compute tpus queued-resources create "$NAME" "--node-id=$NAME" "${LOCATION[@]}" \
    "--accelerator-type=$TYPE" "--runtime-version=$VERSION" "${capacity[@]}"
  # Queued requests can wait hours for capacity; poll rather than hold a long RPC open.
  describe=(gcloud compute tpus queued-resources describe "$NAME" "${LOCATION[@]}"
            "--format=value(state.state)")
  if ((DRY_RUN)); then
    run "${describe[@]}"
    exit 0
  fi
  while true; do
    state="$(run "${describe[@]}")"
    echo "queued resource $NAME: $state" >&2
    case "$state" in
      ACTIVE) break ;;
      FAILED | SUSPENDED) die "queued resource $NAME is $state; delete it and create it again" ;;
    esac
    sleep 60
  done
else
  run gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" \
    "--accelerator-type=$TYPE" "--version=$VERSION" "${capacity[@]}"
fi
