#!/usr/bin/env python3
"""Open a critical-weight study's report.html in headless Chromium and check it against the JSON.

    .venv/bin/python benchmarks/check_study_report.py outputs/smollm2-critical-weights

1. ``hf_sparse.analysis.report.verify_study``: manifest digests, every figure drawn again from
   the JSON files and compared pixel by pixel with ``plots/*.png`` and with the images embedded
   in the report, every key number formatted again from the JSON and found in the report.
2. Headless Chromium (``--chromium``, default ``/usr/bin/chromium``; Debian package
   ``chromium``) renders the report to a PNG screenshot (``--screenshot``), and its DOM dump is
   checked: the page loaded, shows as many images as the folder has plots, every image decoded
   (the dump's ``naturalWidth`` of each is above 0).
Exits non-zero on any problem.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from hf_sparse.analysis.report import verify_study

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
# after load, write each image's decoded width into the DOM so --dump-dom shows it
PROBE = (
    "<script>window.addEventListener('load',()=>{const w=[...document.images]"
    ".map(i=>i.naturalWidth);document.body.insertAdjacentHTML('beforeend',"
    "'<pre id=probe>'+JSON.stringify(w)+'</pre>')})</script>"
)


def _chromium(binary: str, url: str, profile: str, *extra: str) -> subprocess.CompletedProcess:
    command = [binary, *FLAGS, f"--user-data-dir={profile}", *extra, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--screenshot", type=Path, default=None)
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=9000)
    args = parser.parse_args()
    try:
        problems = verify_study(args.folder)
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
    print(f"verify_study: {len(problems)} problem(s)")
    for problem in problems:
        print("  " + problem)
    plots = sorted((args.folder / "plots").glob("*.png"))
    screenshot = args.screenshot or args.folder / "report_screenshot.png"
    with tempfile.TemporaryDirectory() as tmp:
        probed = Path(tmp) / "report.html"
        probed.write_text(
            (args.folder / "report.html").read_text().replace("</body>", PROBE + "</body>")
        )
        shot = _chromium(
            args.chromium, (args.folder / "report.html").resolve().as_uri(), f"{tmp}/a",
            f"--screenshot={screenshot.resolve()}", f"--window-size={args.width},{args.height}",
        )  # fmt: skip
        dom = _chromium(args.chromium, probed.as_uri(), f"{tmp}/b", "--dump-dom")
    if shot.returncode != 0 or not screenshot.is_file():
        problems.append(f"chromium screenshot failed: {shot.stderr[-500:]}")
    marker = dom.stdout.split('<pre id="probe">')
    widths = json.loads(marker[1].split("</pre>")[0]) if len(marker) > 1 else None
    if widths is None:
        problems.append(f"chromium did not load the page: {dom.stderr[-500:]}")
    else:
        print(f"chromium: {len(widths)} images, decoded widths {widths}")
        if len(widths) != len(plots):
            problems.append(f"the page shows {len(widths)} images, plots/ has {len(plots)}")
        if any(w <= 0 for w in widths):
            problems.append("an image in the page did not decode")
    print(f"screenshot: {screenshot}")
    print("OK" if not problems else f"FAILED: {len(problems)} problem(s)")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
