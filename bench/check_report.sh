#!/usr/bin/env bash
# Screenshot an evaluation report (python -m jaxedit.evaluate ... --out OUT) in a headless browser
# and check that the page rendered (a PNG that is not one flat colour, tall enough to hold the
# table, the plots and the image grids).
#
#   bash bench/check_report.sh OUT/report.html [SHOT.png]      # default SHOT: OUT/report.png
#
# Uses the first of: chromium / chromium-browser / chromium-headless-shell / google-chrome(-stable)
# (--headless --screenshot), or Python playwright with an installed Chromium (full-page screenshot).
# Neither is part of the project's environment (no browser on the developers' or CI machines; on
# Debian 12 `apt-get install chromium-headless-shell` brings one, ~220 MB with its dependencies):
# without one this exits 77 ("skipped") and says so. report.html is self-contained (inline CSS,
# SVG plots, base64 images), so the page needs no network and no other file.
set -euo pipefail
html="${1:?usage: bench/check_report.sh OUT/report.html [SHOT.png]}"
shot="${2:-$(dirname "$html")/report.png}"
[ -f "$html" ] || { echo "no such file: $html" >&2; exit 2; }
url="file://$(cd "$(dirname "$html")" && pwd)/$(basename "$html")"
py="${PYTHON:-$(dirname "$0")/../.venv/bin/python}"
[ -x "$py" ] || py=python3

browser=""
for b in chromium chromium-browser chromium-headless-shell google-chrome google-chrome-stable; do
  if command -v "$b" >/dev/null 2>&1; then browser="$b"; break; fi
done
if [ -n "$browser" ]; then
  "$browser" --headless --disable-gpu --no-sandbox --hide-scrollbars --window-size=1400,3000 \
    --screenshot="$shot" "$url" >/dev/null 2>&1
elif "$py" -c "import playwright" >/dev/null 2>&1; then
  "$py" - "$url" "$shot" <<'PY'
import sys
from playwright.sync_api import sync_playwright
with sync_playwright() as p:
    browser = p.chromium.launch()
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(sys.argv[1])
    page.screenshot(path=sys.argv[2], full_page=True)
    browser.close()
PY
else
  echo "skipped: no headless browser (chromium, google-chrome or python playwright) on this machine" >&2
  exit 77
fi

"$py" - "$shot" <<'PY'
import sys
import numpy as np
from PIL import Image
im = np.asarray(Image.open(sys.argv[1]).convert("RGB"))
colours = len(np.unique(im.reshape(-1, 3), axis=0))
assert im.shape[0] >= 600 and colours > 50, f"screenshot looks blank: {im.shape}, {colours} colours"
print(f"ok: {sys.argv[1]} {im.shape[1]}x{im.shape[0]}, {colours} colours")
PY
