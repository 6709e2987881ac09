#!/usr/bin/env bash
# Deletes a TPU VM slice (or its queued resource, with the node in it). Checkpoints and
# logs in the bucket are kept.
#
#   launch/delete.sh --name=NAME --zone=ZONE [--project=P] [--queued] [--dry_run]

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

QUEUED=0
while (($#)); do
  common_flag "$1" || case "$1" in
    --queued) QUEUED=1 ;;
    *) die "unknown argument: $1" ;;
  esac
  shift
done
require "$NAME" --name "the TPU VM (and queued resource) name"
require "$ZONE" --zone "e.g. us-east5-b"
gcloud_location

if ((QUEUED)); then
  # --force also deletes the node the queued resource holds.
  run gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
fi
