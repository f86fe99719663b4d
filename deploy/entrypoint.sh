#!/bin/sh
# The image's entrypoint: migrate the database, then serve on 0.0.0.0:8000.
# Arguments starting with "-" are added to `chatmeter serve` (e.g. --workers 4); any other
# command runs instead (e.g. `chatmeter token --user alice`).
set -e
if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    chatmeter db upgrade
    exec chatmeter serve --host 0.0.0.0 --port 8000 "$@"
fi
exec "$@"
