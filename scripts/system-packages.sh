#!/usr/bin/env bash
# Install, from Debian's packages, those of the given packages whose program is missing.
# Arguments are PROGRAM=PACKAGE pairs; a program is a command on PATH or an absolute path.
# Only what is missing is asked for: on a machine whose Node.js came from elsewhere
# (NodeSource's nodejs ships npm), asking for Debian's npm as well is a conflict apt
# refuses, and the whole install fails.
set -euo pipefail
missing=()
for pair in "$@"; do
    program=${pair%%=*}
    package=${pair#*=}
    if [[ $program == /* ]]; then
        [[ -x $program ]] && continue
    else
        command -v "$program" >/dev/null && continue
    fi
    missing+=("$package")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
if [[ $(id -u) == 0 ]]; then sudo=(); else sudo=(sudo); fi
echo "installing: ${missing[*]}" >&2
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
