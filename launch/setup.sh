#!/usr/bin/env bash
# Installs the project on every worker of a slice: the committed tree at --ref (so all
# workers run the same code), Python 3.12 through uv (TPU images ship 3.10; the project
# needs >= 3.11), jax[tpu], the bundled demo data; then checks that all workers join one
# JAX process group and see the whole slice.
#
#   launch/setup.sh --name=NAME --zone=ZONE [--project=P] [--ref=HEAD] [--dry_run]

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

REF=HEAD
while (($#)); do
  common_flag "$1" || case "$1" in
    --ref=*) REF="${1#*=}" ;;
    *) die "unknown argument: $1" ;;
  esac
  shift
done
require "$NAME" --name "the TPU VM name"
require "$ZONE" --zone "e.g. us-east5-b"
gcloud_location

# Uncommitted changes are not shipped: a run must be reproducible from a commit.
tarball="${TMPDIR:-/tmp}/$REMOTE_DIR.tar.gz"
run git -C "$REPO_DIR" archive --format=tar.gz "--output=$tarball" "$REF"
run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:$REMOTE_DIR.tar.gz" "${LOCATION[@]}" --worker=all

steps=(
  "rm -rf $REMOTE_DIR" "mkdir $REMOTE_DIR" "tar -xzf $REMOTE_DIR.tar.gz -C $REMOTE_DIR"
  "python3 -m pip install -q --user uv"  # ssh starts in the home directory
  ".local/bin/uv venv -q --python 3.12 --allow-existing venv"
  ".local/bin/uv pip install -q --python venv/bin/python -e ./$REMOTE_DIR 'jax[tpu]' gcsfs"  # gcsfs: gs:// workdirs
  "cd $REMOTE_DIR" "../venv/bin/python -m mobilemoe_jax.data.build --out data"
)
install="$(printf ' && %s' "${steps[@]}")"
install="${install# && }"
tpu_ssh all "$install"
# Every worker prints its process index and the slice-wide device count, then all of them
# sum a value across the slice: a worker that cannot reach the others fails here, not
# an hour into a run.
tpu_ssh all "cd $REMOTE_DIR && ../venv/bin/python -m mobilemoe_jax.distributed"
