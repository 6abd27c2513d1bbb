"""HTML reports (analyses.report): escaping, offline assembly, caps, sweeps, and a real run.

``hostile_report()`` is a synthetic report whose tokens and names try to break out of the page;
tests/test_report_browser.py opens it in headless Chromium.
"""

import json
import re
import time
from dataclasses import replace

import pytest
import torch

from analyses.logit_lens import LogitLens
from analyses.polarity import PolarityCensus
from analyses.report import ReportOptions, collect, page, render, render_sweep, write
from analyses.report.circuits import BOOT_JS, bundle, csp_hash, script_json
from analyses.report.gather import controls, fronts
from analyses.report.layout import Card, Example, Match, Report, SAESection
from analyses.steering import Dial, DialPoint
from sign_sae.errors import SignSAEError
from sign_sae.runs import Inputs, SweepConfig, run_sweep

HOSTILE = [
    "</script><img src=x onerror=alert(1)>",
    "<img/src/onerror=alert(2)>",
    "<svg/onload=alert(5)>",
    "</ScRiPt ><script>alert(3)</script>",
    "<!--<script>",
    '" onmouseover="alert(4)',
    "&lt;b&gt;",
    "\u2028\u2029",
]


def hostile_report(n_cards: int = 2, n_examples: int = 3, n_rows: int = 3) -> Report:
    """A two-SAE report (one signed, one non-negative) full of hostile strings."""
    gen = torch.Generator().manual_seed(0)
    d_sae = 64

    def census(signed: bool) -> PolarityCensus:
        n_pos = torch.randint(0, 200, (d_sae,), generator=gen)
        n_neg = torch.randint(0, 200, (d_sae,), generator=gen) if signed else torch.zeros(d_sae)
        return PolarityCensus(
            n_pos=n_pos.long(),
            n_neg=n_neg.long(),
            mass_pos=n_pos.double() * 1.5,
            mass_neg=n_neg.double() * 0.7,
            n_tokens=1000,
            hook_name="blocks.1.hook_mlp_out",
        )

    def example(sign: float) -> Example:
        tokens = ["Hello", *HOSTILE, " world"]
        values = [sign * float(v) for v in torch.rand(len(tokens), generator=gen)]
        return Example(seq=0, pos=3, value=values[3], tokens=tokens, values=values)

    lens = LogitLens([1, 2], HOSTILE[:2], [3.0, 2.0], [3, 4], HOSTILE[2:4], [2.5, 1.0])
    points = [
        DialPoint(a, abs(a) * 0.1, a * 0.2, -a * 0.1, [(HOSTILE[0], 0.3)], [(HOSTILE[1], -0.2)], [])
        for a in (-2.0, 0.0, 2.0)
    ]
    dial = Dial(
        "blocks.1.hook_mlp_out", [0], "add", 2.5, HOSTILE[:1], HOSTILE[1:2], points, 1.0, 1.0
    )

    def card(i: int, other: str) -> Card:
        return Card(
            latent=i,
            pos=[example(1.0) for _ in range(n_examples)],
            neg=[example(-1.0) for _ in range(n_examples)],
            lens=lens,
            dial=dial,
            matches=[Match("+", other, 1, 0.9), Match("-", other, 2, 0.8)],
            notes=[HOSTILE[0]],
        )

    def section(name: str, arch: str, other: str) -> SAESection:
        c = census(arch == "sa_gsae")
        return SAESection(
            name=name,
            architecture=arch,
            hook="blocks.1.hook_mlp_out",
            d_in=8,
            d_sae=d_sae,
            params=[("W_enc", (8, d_sae)), ("W_dec", (d_sae, 8)), ("b_dec", (8,))],
            census=c,
            controls=controls(c, None),
            cards=[card(i, other) for i in range(n_cards)],
            n_cut=5,
        )

    sections = [
        section(name, arch, other)
        for name, arch, other in (
            ("sa" + HOSTILE[0], "sa_gsae", "gated"),
            ("gated", "gated", "sa" + HOSTILE[0]),
        )
    ]
    rows = [
        {"name": HOSTILE[k % len(HOSTILE)], "architecture": ("sa_gsae", "gated")[k % 2],
         "r2": 0.5 + 0.4 * k / n_rows, "l0": 5.0 + k, "n_params": 1000 + k, HOSTILE[1]: k}
        for k in range(n_rows)
    ]  # fmt: skip
    facts = [(HOSTILE[0], HOSTILE[1])]
    return Report(title=HOSTILE[0], facts=facts, rows=rows, saes=sections, fronts=fronts(rows))


def _outside_json(html: str) -> str:
    """The page without its props block and bundle (the parts that legitimately hold scripts)."""
    html = re.sub(
        r'<script type="application/json" id="cv-props">.*?</script>', "", html, flags=re.S
    )
    return html.replace(bundle(), "")


def test_script_json_is_inert_and_round_trips() -> None:
    data = {"tokens": HOSTILE, "k": [1.5, -2]}
    text = script_json(data)
    assert not re.search(r"[<>&\u2028\u2029]", text)
    assert json.loads(text) == data


def test_bundle_is_inlined_once_and_cannot_end_its_script() -> None:
    js = bundle()
    assert len(js) > 1_000_000 and "CircuitsVis" in js
    assert not re.search(r"</script|<!--|sourceMappingURL", js, flags=re.I)


def test_hostile_strings_never_reach_the_page_as_markup() -> None:
    html = page(hostile_report())
    assert html.count(bundle()) == 1 and "unpkg" not in html
    # one script element each: the props (JSON), the bundle, the boot script
    assert len(re.findall(r"<script\b", _outside_json(html))) == 2  # bundle + boot, outside JSON
    assert len(re.findall(r"</script>", html)) == 3
    rest = _outside_json(html)
    for bad in ("<img", "<svg/", "<script>alert", "<!--", '" onmouseover'):
        assert bad not in rest
    assert "&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in rest  # shown as text
    props = re.search(r'id="cv-props">(.*?)</script>', html, flags=re.S).group(1)
    specs = json.loads(props)
    tokens = specs["cv-0"]["props"]["tokens"]
    # circuitsvis sets each token as innerHTML: it must get escaped text
    assert "&lt;img/src/onerror=alert(2)&gt;" in tokens and not any("<" in t for t in tokens)


def test_csp_forbids_network_and_allows_only_the_page_scripts() -> None:
    html = page(hostile_report())
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html).group(1)
    assert "default-src 'none'" in csp and "unsafe-eval" not in csp
    script_src = re.search(r"script-src ([^;]+);", csp).group(1).split()
    assert script_src == [csp_hash(bundle()), csp_hash(BOOT_JS)]


def test_page_shows_tables_figures_cards_and_what_was_cut() -> None:
    html = page(hostile_report(n_cards=2, n_examples=3))
    for heading in ("Held-out metrics", "Parameter accounting", "Figures", "Latents of gated"):
        assert heading in html
    for title in ("R² vs L0", "Polarity balance", "Bipolar fraction vs threshold", "Minority-sign"):
        assert title in html
    assert html.count('class="card"') == 4 and html.count('class="cv"') == 4 * 6
    assert "showing the top 3 of" in html and "5 more selected latents have no dashboard" in html
    assert "No minority-sign mass (non-negative): gated" in html
    assert 'href="#sae1-latent1"' in html  # a match links to the other SAE's dashboard
    assert "monotonicity 1.00" in html


def test_large_reports_render_fast_and_cap_the_table() -> None:
    report = hostile_report(n_cards=32, n_examples=8, n_rows=2500)
    start = time.perf_counter()
    html = page(report)
    assert time.perf_counter() - start < 10
    assert "500 more rows are not shown" in html
    assert html.count('class="cv"') == 2 * 32 * 16


def test_render_sweep_from_csv_and_json(tmp_path) -> None:
    rows = [
        {"name": f"s{k}", "architecture": ["sa_gsae", "gated"][k % 2], "sparsity": k,
         "r2": 0.6 + 0.01 * k, "l0": 10.0 + 3 * k, "d_sae": 1024}
        for k in range(40)
    ]  # fmt: skip
    (tmp_path / "sweep.json").write_text(json.dumps({"rows": rows}))
    csv_text = "name,architecture,sparsity,r2,l0\n" + "".join(
        f"{r['name']},{r['architecture']},{r['sparsity']},{r['r2']},{r['l0']}\n" for r in rows
    )
    (tmp_path / "sweep.csv").write_text(csv_text + "bad,gated,,,\n")
    for src in ("sweep.json", "sweep.csv"):
        out = render_sweep(tmp_path / src, tmp_path / f"{src}.html")
        html = out.read_text()
        assert "R² vs L0" in html and html.count("<circle") >= 40
        assert "<th>sparsity</th>" in html and 'id="sae0"' not in html
    (tmp_path / "bad.json").write_text('{"r2": 1}')
    with pytest.raises(SignSAEError, match="list of result rows"):
        render_sweep(tmp_path / "bad.json", tmp_path / "bad.html")


def test_write_is_atomic(tmp_path, monkeypatch) -> None:
    out = tmp_path / "report.html"
    write(hostile_report(n_cards=1), out)
    before = out.read_text()

    def broken(report: Report) -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr("analyses.report.page", broken)
    with pytest.raises(RuntimeError):
        write(hostile_report(), out)
    assert out.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["report.html"]


@pytest.fixture(scope="module")
def tiny_run(model, tmp_path_factory):
    """A real run on SmolLM2: a small SA-GSAE and a Gated SAE on mid-layer MLP-out."""
    cfg = SweepConfig(
        out_dir=str(tmp_path_factory.mktemp("report_run")),
        data={
            "hooks": ["mlp_out"],
            "context_size": 32,
            "train_tokens": 32 * 64,
            "eval_tokens": 32 * 4,
            "ce_tokens": 32 * 4,
            "epochs": 6,  # 40 x 256 rows of 1,984 per epoch
        },
        h_expansion=64 / 576,
        train={"total_steps": 40, "batch_size": 256, "lr": 2e-3, "log_every": 20},
        grid=[
            {"label": "sa", "arch": "sa_gsae", "sparsity": [3.0]},
            {"label": "gated", "arch": "gated", "width": 2, "sparsity": [3.0]},
        ],
    )
    run_sweep(cfg, inputs=Inputs(cfg.data, {"smollm2-135m": model}), progress=False)
    return cfg


def test_real_run_report(model, tiny_run, tmp_path) -> None:
    run = tiny_run.out_dir
    options = ReportOptions(
        model=model,
        n_latents=2,
        n_tokens=32 * 6,
        n_examples=3,
        alphas=(-1.0, 0.0, 1.0),
        n_prompts=1,
        prompt_len=12,
    )
    out = render(run, tmp_path / "r.html", options)
    html = out.read_text()
    assert html.count('class="card"') == 4  # 2 signed latents, 2 matching gated latents
    assert "Latents of sa" in html and "Latents of gated" in html
    assert "Steering latent" in html and "Logit lens" in html and "R² vs L0" in html
    # every statistic beside its control; a dial either beside random directions or marked
    assert "against their controls" in html and "mirrored" in html
    assert "opposites is not measured" in html
    assert html.count("random directions [") + html.count("this dial has no control") >= 2
    assert "unpkg" not in html and html.count(bundle()) == 1
    props = json.loads(re.search(r'id="cv-props">(.*?)</script>', html, flags=re.S).group(1))
    assert props and all(p["props"]["tokens"] for p in props.values())
    # a non-negative SAE's dashboards show the latents matching the signed ones' directions
    few = ReportOptions(model=model, n_tokens=32 * 4, alphas=())
    report = collect(run, replace(few, latents={"sa": [0]}))
    # the metrics table: the run's rows under the names of its sections
    assert [(r["name"], r["d_sae"]) for r in report.rows] == [("sa", 64), ("gated", 128)]
    assert all(r["r2"] > 0 and r["train_s"] > 0 for r in report.rows)
    gated = report.saes[1]
    sa_matches = [m.latent for m in report.saes[0].cards[0].matches]
    assert [c.latent for c in gated.cards] == sa_matches
    assert all(c.dial is None for c in gated.cards)
    with pytest.raises(SignSAEError, match="out of range"):
        collect(run, replace(few, latents=[10_000]))
    with pytest.raises(FileNotFoundError, match="no sweep.yaml"):
        render(tmp_path, tmp_path / "x.html", few)


def test_default_picks_are_distinct_axes() -> None:
    """The most bipolar latents are picked one axis each: a latent whose decoder direction is
    within |cos| 0.5 of a picked one (either sign) is skipped for the next in order."""
    from types import SimpleNamespace

    from analyses.report.gather import _top

    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(3, 64, generator=g), dim=-1)
    noise = 0.1 * torch.randn(3, 64, generator=g)
    # latents 0, 1 and 2 share one axis (1 near +d0, 2 near -d0); 3 and 4 are other axes
    W_dec = torch.stack([base[0], base[0] + noise[0], -base[0] + noise[1], base[1], base[2]])
    minority = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    census = SimpleNamespace(
        mass_pos=torch.ones(5), mass_neg=torch.ones(5), minority_mass=minority,
        alive=torch.tensor([True, True, True, True, True]),
    )  # fmt: skip
    assert _top(census, 3, W_dec) == [0, 3, 4]
    assert _top(census, 2, torch.eye(5, 64)) == [0, 1]  # orthogonal: plain minority-mass order
    census.alive[0] = False
    assert _top(census, 3, W_dec) == [1, 3, 4]


def test_whitespace_tokens_render_as_visible_markers() -> None:
    """Steering and logit-lens chips use the examples' markers, never an empty-looking chip."""
    from analyses.report.layout import show_token

    chip = lambda t: re.fullmatch(r'<code class="tok">(.*)</code>', show_token(t)).group(1)  # noqa: E731
    assert [chip(t) for t in ("   ", "\n\n", "\t", "\xa0", "")] == ["␣␣␣", "↵↵", "→", "␣", "∅"]
    assert chip(" the") == " the" and chip("<b>") == "&lt;b&gt;"
