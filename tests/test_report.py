"""bench.report: renders from the committed fixture run and from a fresh CPU run; the HTML parses and
holds every section with its embedded images; odd runs (all skipped, no seq_len axis, no cases)
still render; the headline leads with cuTile (and says when it did not run); a headless screenshot
shows the headline table and a plot where Chromium exists."""
import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import pytest

from bench import report as report_cli
from bench.present import report
from bench.run import main as run_main
from test_compare import exit_code, record, write_run

FIXTURE = Path(__file__).resolve().parent.parent / "results" / "fixtures" / "h100_synthetic"
SECTIONS = {"environment", "headline", "failures", "skipped"}


class Page(HTMLParser):
    """Section ids, embedded PNGs and table count of a report."""

    def __init__(self, text: str):
        super().__init__()
        self.sections, self.images, self.tables = set(), [], 0
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.add(attrs["id"])
        elif tag == "table":
            self.tables += 1
        elif tag == "img":
            src = attrs["src"]
            assert src.startswith("data:image/png;base64,"), "images must be embedded"
            self.images.append(base64.b64decode(src.split(",", 1)[1]))


def render(run_dir, tmp_path, *extra) -> tuple[Page, str, str]:
    out = tmp_path / "out" / "report.html"
    assert report_cli.main([str(run_dir), "-o", str(out), *extra]) == 0
    html = out.read_text()
    return Page(html), html, (out.parent / "report.md").read_text()


def test_fixture_renders_every_section_with_images(tmp_path):
    page, html, md = render(FIXTURE, tmp_path)
    assert SECTIONS | {"per-step", "workload-fmha", "workload-layernorm",
                       "workload-model_step"} <= page.sections
    assert "comparison" not in page.sections
    # fmha: time, TFLOP/s, tile heatmap; layernorm: time, GB/s; model_step: time; per-step chart
    assert len(page.images) >= 7
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in page.images)
    assert "NVIDIA H100 80GB HBM3" in html and "580.159.04" in html and "sw_power_cap" in html
    assert "tileiras compile exceeded" in html and "TileGym is not installed" in html
    assert "reported on other hardware" in html
    assert "### cuTile against PyTorch" in md
    # fmha: cuTile's best config at seq_len=256 is 1.22x faster than sdpa-flash, its worst shape
    assert "| vs the best PyTorch provider | 3 | 1.33x faster | 1.22x faster at seq_len=256 |" in md
    assert "1.04x slower at model=gpt2" in md  # a loss reads as a loss
    assert "### Per-step comparison" in md and "Reference, not a measurement of this run: " \
        "the seed reports 2.8 ms" in md
    # skipped cases apart from failures, one row per reason
    assert "TileGym is not installed" in html.split('id="skipped"')[1]
    assert "TileGym is not installed" not in html.split('id="failures"')[1].split('id="skipped"')[0]
    assert '<span class="status-skipped">1 skipped</span>' in html  # not coloured as a failure


def test_baseline_adds_the_comparison(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(FIXTURE, base)
    lines = (base / "samples.jsonl").read_text().splitlines()
    # the baseline was 20% faster on the first case: the fixture run is a regression against it
    first = json.loads(lines[0])
    first["samples_ms"] = [v / 1.2 for v in first["samples_ms"]]
    (base / "samples.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    page, html, md = render(FIXTURE, tmp_path, "--baseline", str(base))
    assert "comparison" in page.sections
    assert "1 regression" in html and "regression" in md and "fmha/native" in md


def test_fresh_cpu_run_renders(tmp_path, write_sweep, capsys):
    sweep = write_sweep("""
workload: layernorm
baseline: torch
providers: [torch, cutile]
axes: {rows: [8], hidden: [32, 64], dtype: [float32], mode: [fwd]}
timing: {warmup_ms: 1, min_reps: 5, max_reps: 20, max_time_s: 0.05, timeout_s: 60}
""")
    assert run_main([str(sweep), "--out", str(tmp_path / "results")]) == 0
    capsys.readouterr()
    page, html, md = render(tmp_path / "results" / "latest", tmp_path)
    assert SECTIONS | {"workload-layernorm"} <= page.sections
    assert len(page.images) >= 2  # time and GB/s vs hidden
    assert "skipped" in html and "cuTile not available" in html  # no GPU here
    assert "(cpu)" in md


def test_odd_runs_still_render(tmp_path):
    skipped = write_run(tmp_path / "skipped", [record("a", [], "skipped", workload="fmha", seq_len=s)
                                               for s in (64, 128)], gpu=None)
    page, html, _ = render(skipped, tmp_path)
    assert SECTIONS <= page.sections and "it was skipped" in html and page.images == []
    no_seq = write_run(tmp_path / "noseq", [record(p, [1.0, 1.1, 0.9], workload="gemm", m=m)
                                            for p in ("p", "q") for m in (1, 2)], gpu=None)
    page, html, _ = render(no_seq, tmp_path)
    assert "workload-gemm" in page.sections and "No plot" in html
    empty = write_run(tmp_path / "empty", [], gpu=None)
    page, html, _ = render(empty, tmp_path)
    assert SECTIONS <= page.sections and "no cases" in html


def fmha_run(path, providers, status="ok", reason=""):
    recs = [{**record(p, [1.0 + i, 1.1 + i, 0.9 + i], workload="fmha", seq_len=s, batch=b),
             "baseline": "native"} for p in providers for i, (s, b) in enumerate(((64, 8), (128, 4)))]
    for r in recs:
        if r["provider"].startswith("cutile") and status != "ok":
            r.update(status=status, reason=reason, samples_ms=[])
    return write_run(path, recs, gpu=None)


def test_fmha_only_run_has_no_per_step_section(tmp_path):
    page, html, md = render(fmha_run(tmp_path / "r", ["native", "cutile"]), tmp_path)
    assert "per-step" not in page.sections and "Per-step" not in md and "2.8 ms" not in html


def test_a_run_without_cutile_says_so_in_the_headline(tmp_path):
    page, html, md = render(fmha_run(tmp_path / "none", ["native", "sdpa-flash"]), tmp_path)
    assert "cuTile did not run: no cuTile provider was part of this run." in md
    assert "cuTile did not run" in html.split('id="headline"')[1].split("</section>")[0]
    page, html, md = render(fmha_run(tmp_path / "skip", ["native", "cutile"], "skipped",
                                     "cuTile not available: no GPU"), tmp_path)
    assert "cuTile did not run: skipped: cuTile not available: no GPU (2 cases)." in md


def test_zipped_axes_label_points_instead_of_joining_them(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(report.plots, "lines_vs_axis", lambda *a, **kw: drawn.append(kw) or [])
    render(fmha_run(tmp_path / "r", ["native", "cutile"]), tmp_path)
    assert drawn and all(kw["zipped"] == ["batch"] for kw in drawn)  # batch changes with seq_len


def test_a_case_faster_than_its_ceiling_is_suspect_and_not_a_win(tmp_path):
    # 1 GB at a 1000 GB/s ceiling takes at least 1 ms: cutile's 0.5 ms is impossible
    recs = [{**record(p, [ms] * 3, workload="layernorm", hidden=768, dtype="float16"),
             "baseline": "torch", "bytes": 1e9} for p, ms in (("torch", 2.0), ("cutile", 0.5))]
    run = write_run(tmp_path / "r", recs)
    meta = json.loads((run / "meta.json").read_text())
    meta["ceilings"] = {"gpu": "GPU", "measured": {"copy_gbps": 1000.0, "tflops": {}}}
    (run / "meta.json").write_text(json.dumps(meta))
    page, html, md = render(run, tmp_path)
    assert ">suspect<" in html.split('id="table-layernorm"')[1]
    assert "cuTile gave no usable time: suspect: faster than the measured ceiling (1 case)." in md
    assert "device-to-device copy 1.00 TB/s" in md


def test_rows_sort_numerically(tmp_path):
    recs = [record("p", [1.0], workload="gemm", m=m) for m in (127, 64, 1024)]
    page, html, _ = render(write_run(tmp_path / "r", recs, gpu=None), tmp_path)
    body = html.split('id="table-gemm"')[1]
    assert body.index(">64<") < body.index(">127<") < body.index(">1024<")


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "meta.json").write_text("[1, 2")
    for argv in (["nowhere"], [str(tmp_path / "bad")], [str(FIXTURE), "--baseline", "nowhere"],
                 [str(FIXTURE), "--colour"]):
        assert exit_code(report_cli.main, argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error:")


HEADER = (0xe3, 0xea, 0xf5)  # table headers' background (base.html.j2)
LINE = (0x1f, 0x77, 0xb4)  # matplotlib's first line colour


def rows_of(img, colour, tol: float = 6 / 255) -> list[int]:
    """Screen rows holding a run of at least 100 pixels of `colour`."""
    near = (abs(img[..., :3] - [c / 255 for c in colour]) <= tol).all(axis=-1)
    return [y for y in range(near.shape[0]) if near[y].sum() >= 100]


def test_headless_screenshot_shows_the_headline_table_and_a_plot(tmp_path):
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                    if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no chromium on PATH (install it to check the report in a real browser)")
    html = tmp_path / "out" / "report.html"
    render(FIXTURE, tmp_path)
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1400,3000", html.as_uri()], check=True, timeout=120,
                   capture_output=True)
    img = matplotlib.image.imread(shot)
    headers = rows_of(img, HEADER)
    assert headers and headers[0] < 400, "the headline table heads the page"
    line = (abs(img[..., :3] - [c / 255 for c in LINE]) <= 0.05).all(axis=-1)
    assert line.sum() > 500, "a plot's lines are drawn"
    assert line.any(axis=1).nonzero()[0][0] > headers[0], "the plots come after the headline"


def test_headline_is_one_verdict_per_regime():
    import pandas as pd
    rows = []
    for graph, cut_ms in ((False, 2.0), (True, 0.9)):
        for prov, ms in (("cutile", cut_ms), ("torch", 1.0)):
            rows.append({"provider": prov, "status": "ok", "suspect": False, "graph": graph,
                         "mode": "fwd", "shape_short": "batch=1", "config": "", "median_ms": ms,
                         "baseline": "torch", "reason": None})
    heads = report.headlines("w", pd.DataFrame(rows))
    assert [h.name for h in heads] == ["w (graph=False)", "w (graph=True)"]
    assert heads[0].summary.rows[0][2][0].endswith("slower")
    assert heads[1].summary.rows[0][2][0].endswith("faster")


def test_tuned_section_follows_the_results_and_presenter_names_no_workload():
    text = (Path(report.TEMPLATES) / "report.html.j2").read_text()
    assert text.index('include "tuned.html.j2"') > text.index("{% for s in sections %}")
    src = Path(report.__file__).read_text()
    assert '"torch-naive"' not in src.split("def model_step")[0]
