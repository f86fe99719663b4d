#!/bin/sh
# Re-vendors the web page's JavaScript libraries from npm into chatmeter/web/static/vendor/
# (`make vendor-web`). The page needs no build step: the files below are committed as npm
# ships them, with their licences, and VERSIONS records what came from where.
set -eu

MARKED=18.2.1
DOMPURIFY=3.5.0
HIGHLIGHT=11.12.0 # @highlightjs/cdn-assets: the prebuilt common-languages bundle

here=$(cd "$(dirname "$0")/.." && pwd)
out="$here/chatmeter/web/static/vendor"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cd "$work"
npm pack --silent "marked@$MARKED" "dompurify@$DOMPURIFY" "@highlightjs/cdn-assets@$HIGHLIGHT" >/dev/null
for tgz in *.tgz; do
    mkdir "${tgz%.tgz}"
    tar xzf "$tgz" -C "${tgz%.tgz}"
done

rm -rf "$out"
mkdir -p "$out"
cp "marked-$MARKED/package/lib/marked.esm.js" "$out/marked.esm.js"
cp "marked-$MARKED/package/LICENSE" "$out/LICENSE.marked"
cp "dompurify-$DOMPURIFY/package/dist/purify.es.mjs" "$out/purify.es.mjs"
cp "dompurify-$DOMPURIFY/package/LICENSE" "$out/LICENSE.dompurify"
cp "dompurify-$DOMPURIFY/package/LICENSE-MPL" "$out/LICENSE-MPL.dompurify"
hl="highlightjs-cdn-assets-$HIGHLIGHT/package"
cp "$hl/es/highlight.min.js" "$out/highlight.min.js"
cp "$hl/styles/github.min.css" "$out/highlight-github.min.css"
cp "$hl/styles/github-dark.min.css" "$out/highlight-github-dark.min.css"
cp "$hl/LICENSE" "$out/LICENSE.highlight.js"

cat > "$out/VERSIONS" <<VERSIONS
# Vendored by scripts/vendor-web.sh from the npm registry (https://registry.npmjs.org/),
# copied as published. Re-vendor: edit the versions in the script, run \`make vendor-web\`.
marked $MARKED                  lib/marked.esm.js                      MIT (LICENSE.marked)
dompurify $DOMPURIFY                dist/purify.es.mjs                     Apache-2.0 or MPL-2.0 (LICENSE.dompurify, LICENSE-MPL.dompurify)
@highlightjs/cdn-assets $HIGHLIGHT es/highlight.min.js (common languages), styles/github(-dark).min.css   BSD-3-Clause (LICENSE.highlight.js)
VERSIONS
(cd "$out" && sha256sum marked.esm.js purify.es.mjs highlight.min.js \
    highlight-github.min.css highlight-github-dark.min.css >> VERSIONS)
echo "vendored into $out:"
ls -l "$out"
