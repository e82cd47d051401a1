#!/bin/sh
# The image's entrypoint: prepare the models in MOERGE_HOME (a volume; idempotent and checksummed, so only
# the first start converts them), then run the command (default: moerge serve).
set -eu
moerge assets
exec "$@"
