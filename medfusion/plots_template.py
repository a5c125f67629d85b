"""The HTML page `dvc plots show` / `dvc plots diff` write, with Vega, Vega-Lite and Vega-Embed inlined,
so that the curves draw offline (DVC's own page loads them from a CDN).

    python -m medfusion.plots_template            # (re)writes .dvc/plots/offline.html

.dvc/config sets `plots.html_template = plots/offline.html` (relative to .dvc/), and the page is
committed: a fresh clone draws its plots without this module. It has DVC's `{plot_divs}` and
`{refresh_tag}` placeholders but no `{scripts}`, where DVC would put its CDN <script> tags. The
libraries come from vl-convert-python (`javascript_bundle`, a dev dependency: only regenerating
the page needs it), Vega-Lite 5 as DVC's templates are written for it; they are BSD-3-licensed
(the Vega project), their notices stay in the bundle.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / ".dvc" / "plots" / "offline.html"
VEGA_LITE = "5.21"  # DVC's plot templates are Vega-Lite 5 specs

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- Vega __VEGA__, Vega-Lite __VEGA_LITE__, Vega-Embed __EMBED__ (BSD-3-Clause, the Vega project),
         inlined so that the page needs no network: medfusion/plots_template.py -->
    <script>
(function () {
__BUNDLE__
})();
    </script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def build_page() -> str:
    """The page's text, with the libraries as vl-convert-python bundles them."""
    import vl_convert

    bundle = vl_convert.javascript_bundle(
        "window.vega = vega; window.vegaLite = vegaLite; window.vegaEmbed = vegaEmbed;", vl_version=VEGA_LITE
    )
    if "</script" in bundle or "{plot_divs}" in bundle or "{scripts}" in bundle:
        raise ValueError("the bundle holds text that would end the inline <script> or a DVC placeholder")
    return (
        PAGE.replace("__VEGA__", vl_convert.get_vega_version())
        .replace("__VEGA_LITE__", VEGA_LITE)
        .replace("__EMBED__", vl_convert.get_vega_embed_version())
        .replace("__BUNDLE__", bundle)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=TEMPLATE)
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(build_page(), encoding="utf8")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
