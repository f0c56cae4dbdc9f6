#!/usr/bin/env bash
# Regenerate the documentation's figures from a real run, end to end:
#
#   docs/images/report.png                    `python -m lightning_evalguard report LOGDIR --png ...`
#   docs/images/three-sources.png             docs/gap_figure.py: the gap split into its three causes
#   docs/images/tensorboard-custom-scalars.png a headless-Chromium screenshot of TensorBoard's "Custom Scalars" tab
#
# It trains examples/digits.py with --decompose into a temporary directory (about 1.5 minutes on 2 CPU cores), runs
# the report command and docs/gap_figure.py on its logs, starts TensorBoard on a free local port, waits until it
# serves EvalGuard's scalars, takes the screenshot, stops the server and deletes the temporary directory.
#
# Usage, from anywhere:   bash docs/make_figures.sh
# Needs: the package with its `examples` and `plot` extras (scikit-learn, matplotlib; Pillow comes with matplotlib)
# and Chromium (Debian/Ubuntu: `apt-get install -y chromium`). Environment: PYTHON (default .venv/bin/python, else
# python3), CHROMIUM (default: the first of chromium, chromium-browser, google-chrome found on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
chromium="${CHROMIUM:-}"
if [ -z "$chromium" ]; then
  for candidate in chromium chromium-browser google-chrome; do
    if command -v "$candidate" >/dev/null 2>&1; then chromium="$candidate"; break; fi
  done
fi
if [ -z "$chromium" ]; then
  echo "make_figures.sh: no Chromium found; install it (apt-get install -y chromium) or set CHROMIUM=" >&2
  exit 1
fi

images=docs/images
mkdir -p "$images"
work="$(mktemp -d)"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "== training examples/digits.py --decompose into $work"
"$python" examples/digits.py --root-dir "$work" --quiet --decompose
logdir="$work/lightning_logs"

echo "== report command"
"$python" -m lightning_evalguard report "$logdir" --png "$images/report.png"

echo "== the three sources of bias"
"$python" docs/gap_figure.py "$logdir" "$images/three-sources.png"

echo "== TensorBoard custom-scalars screenshot"
port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$python" -m tensorboard.main --logdir "$logdir" --host 127.0.0.1 --port "$port" >"$work/tensorboard.log" 2>&1 &
server_pid=$!
# Wait until the server answers and has loaded EvalGuard's scalars (it reads event files in the background).
"$python" - "$port" <<'EOF'
import json, sys, time, urllib.request

url = f"http://127.0.0.1:{sys.argv[1]}/data/plugin/scalars/tags"
deadline = time.monotonic() + 120
while True:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            tags = json.load(response)
        if any("evalguard/clean/acc" in run_tags for run_tags in tags.values()):
            break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit("TensorBoard did not serve evalguard/clean/acc within 120 s; see its log")
    time.sleep(1)
EOF

raw="$work/screenshot.png"
# `_smoothingWeight=0` in the URL turns TensorBoard's default smoothing (0.6) off, so the charts show the logged values.
for budget in 15000 30000 60000; do
  rm -f "$raw"
  "$chromium" --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
    --no-first-run --user-data-dir="$work/chromium" --window-size=1100,820 --virtual-time-budget="$budget" \
    --screenshot="$raw" "http://127.0.0.1:$port/#custom_scalars&_smoothingWeight=0" >"$work/chromium.log" 2>&1 || true
  # Keep the screenshot only when the charts were drawn: TensorBoard draws lines and markers in its run colour
  # (orange-red); an empty dashboard has almost none of it outside the header and the sidebar.
  if [ -f "$raw" ] && "$python" - "$raw" "$images/tensorboard-custom-scalars.png" <<'EOF'
import sys

import numpy as np
from PIL import Image

image = Image.open(sys.argv[1]).convert("RGB")
width, height = image.size
pixels = np.asarray(image).astype(int)
main = pixels[120:, 300:]
drawn = int(((main[..., 0] > 200) & (main[..., 1] < 150) & (main[..., 2] < 120)).sum())
if drawn < 2000:
    print(f"charts not drawn yet ({drawn} chart pixels)", file=sys.stderr)
    sys.exit(1)
# Crop the empty page background below the dashboard.
background = pixels[height - 2, width - 2]
bottom = height
while bottom > 1 and (pixels[bottom - 1, 300 : width - 20] == background).all():
    bottom -= 1
image = image.crop((0, 0, width, min(height, bottom + 16)))
image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(sys.argv[2], optimize=True)
print(f"wrote {sys.argv[2]} ({image.size[0]}x{image.size[1]})")
EOF
  then
    break
  fi
  if [ "$budget" = 60000 ]; then
    echo "make_figures.sh: TensorBoard's charts were not drawn in the screenshot; see $work/chromium.log" >&2
    trap - EXIT
    kill "$server_pid" 2>/dev/null || true
    exit 1
  fi
done

for image in "$images/report.png" "$images/three-sources.png" "$images/tensorboard-custom-scalars.png"; do
  echo "$image: $(($(wc -c <"$image") / 1024)) KiB"
done
