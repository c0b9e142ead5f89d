"""The feature browser renders one card per latent in headless Chromium (skipped when Chromium is absent;
`shell/install-chromium.sh` installs it)."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from ssae_common.explain.browser import write_browser

CHROMIUM = next((c for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (shell/install-chromium.sh)")


def _window(tokens, acts, mark, active=None):
    w = {"doc": 0, "doc_id": "d0", "row": 5, "start": 3, "tokens": tokens, "token_ids": list(range(len(tokens))),
         "acts": acts, "mark": mark, "value": max(acts)}
    if active is not None:
        w["active"] = active
    return w


def _latent(i, explanation, status="ok"):
    tokens = [" the", " galaxy", " </script><b>x", " star"] if i % 2 else [" cat", " dog", " & ", " house"]
    ctx = {"latent": i, "n_active": 10 * (i + 1), "density": 0.01 * (i + 1), "max_activation": 2.0,
           "mean_activation": 1.0, "histogram": {"edges": [0.0, 1.0, 2.0], "counts": [3, 5], "sample_size": 8},
           "top_tokens": [{"token": tokens[1], "id": 1, "share": 0.5, "mean_act": 1.5}],
           "explain": [_window(tokens, [0.0, 2.0, 0.5, 0.0], 1)],
           "score": [_window(tokens, [0.0, 1.0, 0.0, 0.0], 1, True), _window(tokens, [0.0] * 4, None, False)]}
    rec = {"latent": i, "status": status, "explanation": explanation, "diversity": 20 if explanation else None,
           "diversity_justification": "similar contexts" if explanation else None, "f1": 0.5, "precision": 0.5,
           "recall": 0.5, "predictions": [True, True]}
    if status == "malformed":
        rec["raw_reply"] = "<i>nonsense</i>"
    return ctx, rec


def _dump(url: str) -> str:
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--virtual-time-budget=3000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@needs_chromium
def test_browser_renders_one_card_per_latent(tmp_path):
    items = [_latent(i, f"explanation number {i} about {'galaxies' if i % 2 else 'pets'}") for i in range(6)]
    items.append(_latent(6, None, status="malformed"))
    contexts, records = zip(*items)
    page = tmp_path / "index.html"
    write_browser(str(page), list(contexts), list(records), {"config": {"sae": {"path": "/x/sae"}}})

    dom = _dump(page.as_uri())
    cards = re.findall(r'<section class="card" data-latent="(\d+)"', dom)
    assert cards == [str(i) for i in range(7)]
    assert "7 of 7 latents" in dom
    assert "<b>x" not in dom.split('<script id="data"')[0]  # token text is escaped, not markup
    assert "malformed LM reply: &lt;i&gt;nonsense&lt;/i&gt;" in dom

    dom = _dump(page.as_uri() + "#q=galaxies")  # the search box, prefilled from the URL
    assert re.findall(r'<section class="card" data-latent="(\d+)"', dom) == ["1", "3", "5"]
    assert "3 of 7 latents" in dom

    shot = tmp_path / "shot.png"
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0 and shot.exists(), out.stderr[-2000:]
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 900)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, highlights and the histogram, not a blank page
    assert any(r > 200 and 80 < g < 160 and b < 90 for _, (r, g, b) in colours)  # orange activation highlights
