#!/usr/bin/env bash
# Screenshots of the built site at 1280 px wide, for looking at the layout by hand (headless
# Chromium: Debian's `chromium` package). Usage: make docs && bash tools/screenshot_docs.sh [OUT]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$here/docs/_build/screenshots}"
site="$here/docs/_build/html"
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
[[ -n "$browser" ]] || { echo "no headless Chromium found (Debian: apt-get install chromium)" >&2; exit 2; }
[[ -f "$site/index.html" ]] || { echo "build the site first: make docs" >&2; exit 2; }
mkdir -p "$out"
for page in index concepts cli api tutorials/train-and-read-wandb tutorials/imaml-with-betty; do
    "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,2600 \
        --virtual-time-budget=10000 --screenshot="$out/${page//\//_}.png" "file://$site/$page.html" 2>/dev/null
done
echo "screenshots in $out"
