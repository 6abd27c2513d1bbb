"""circuitsvis pieces for an offline page: the JavaScript bundle inlined once, ``ColoredTokens``
placeholders, and the props that feed them as one escaped JSON block.

Two circuitsvis behaviours this works around (circuitsvis 1.43):

- ``RenderedHTML.local_src`` inlines the 1.3 MB bundle once per component and embeds the props
  with plain ``json.dumps`` inside ``<script>``, so a token containing ``</script>`` ends the
  script early. Here the bundle is inlined once and the props live in a
  ``<script type="application/json">`` block with ``<``, ``>`` and ``&`` written as ``\\u003c``
  etc., which the HTML parser cannot end early.
- ``ColoredTokens`` writes each token with ``dangerouslySetInnerHTML`` (it only turns whitespace
  into ``&nbsp;``), so a token is HTML to it. Tokens are HTML-escaped before they go in; the
  page shows the literal text (line breaks as ↵, tabs as →). Its hover tooltip shows the
  escaped form, e.g. ``&lt;``.
"""

import base64
import hashlib
import json
import math
import re
from collections.abc import Sequence
from functools import cache
from html import escape
from importlib.resources import files
from typing import Any

from analyses.report.plots import NEG_COLOR, POS_COLOR

# Mounts every placeholder; a failure is shown in place and logged, not silently dropped.
BOOT_JS = """(function () {
  var specs = JSON.parse(document.getElementById("cv-props").textContent);
  Object.keys(specs).forEach(function (id) {
    var spec = specs[id], el = document.getElementById(id);
    try {
      CircuitsVis.render(id, CircuitsVis[spec.component], spec.props);
      el.setAttribute("data-mounted", "1");
    } catch (err) {
      el.textContent = "circuitsvis could not draw this example: " + err;
      console.error(err);
    }
  });
})();"""


@cache
def bundle() -> str:
    """The circuitsvis browser bundle (the file ``local_src`` inlines), safe inside ``<script>``:
    ``</script`` and ``<!--`` (inside its string literals) are escaped, the source-map comment
    (a URL a browser may fetch) is dropped."""
    path = files("circuitsvis") / "dist" / "cdn" / "iife.js"
    if not path.is_file():
        raise FileNotFoundError(
            f"The circuitsvis bundle is missing at {path}; reinstall circuitsvis (>= 1.43)."
        )
    js = path.read_text(encoding="utf-8")
    js = re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE).replace("<!--", "<\\!--")
    return re.sub(r"//# sourceMappingURL=\S*\s*$", "", js)


def script_json(data: Any) -> str:
    """JSON that is inert inside a ``<script>`` element: no ``<``, ``>``, ``&``, U+2028/9."""
    text = json.dumps(data, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    for ch, code in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(ch, code)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def csp_hash(source: str) -> str:
    """A Content-Security-Policy source expression allowing exactly this inline script."""
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


def content_security_policy() -> str:
    """No network of any kind; only the bundle and the boot script may run."""
    scripts = " ".join(csp_hash(s) for s in (bundle(), BOOT_JS))
    return (
        f"default-src 'none'; script-src {scripts}; style-src 'unsafe-inline'; "
        "base-uri 'none'; form-action 'none'"
    )


class Components:
    """The circuitsvis components of one page: each call returns a placeholder ``<div>`` and
    records its props; ``props_json()`` is the data the boot script renders from."""

    def __init__(self) -> None:
        self._specs: dict[str, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self._specs)

    def colored_tokens(self, tokens: Sequence[str], values: Sequence[float], limit: float) -> str:
        """Tokens shaded by value on a symmetric scale [-limit, limit]: ``POS_COLOR`` above 0,
        ``NEG_COLOR`` below, white at 0. The placeholder holds the plain text until mounted."""
        div_id = f"cv-{len(self._specs)}"
        limit = limit if math.isfinite(limit) and limit > 0 else 1.0
        self._specs[div_id] = {
            "component": "ColoredTokens",
            "props": {
                "tokens": [escape(visible_token(t)) for t in tokens],
                "values": [float(v) if math.isfinite(v) else 0.0 for v in values],
                "minValue": -limit,
                "maxValue": limit,
                "negativeColor": NEG_COLOR,
                "positiveColor": POS_COLOR,
            },
        }
        return f'<div class="cv" id="{div_id}">{escape("".join(map(visible_token, tokens)))}</div>'

    def props_json(self) -> str:
        return script_json(self._specs)


def visible_token(token: str) -> str:
    """Line breaks and tabs as symbols, so each example stays on one line."""
    return token.replace("\r\n", "↵").replace("\n", "↵").replace("\r", "↵").replace("\t", "→")
