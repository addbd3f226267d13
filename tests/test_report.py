"""bench.report: renders from the committed fixture run and from a fresh CPU run; the HTML parses and
holds every section with its embedded images; odd runs (all skipped, no seq_len axis, no cases)
still render; the headline leads with each workload's subject (and says when it did not run), one
verdict per regime, never counting a suspect case; plots and tables follow the hints a run recorded,
and the presenter names no workload or provider; a headless screenshot shows the headline table and
a plot where Chromium exists."""
import base64
import json
import re
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
    assert SECTIONS | {"workload-fmha", "workload-layernorm", "workload-model_step"} <= page.sections
    assert "comparison" not in page.sections and "per-step" not in page.sections
    # fmha: speedup along seq_len, tile heatmap; layernorm: speedup along hidden; model_step: bars
    # per model (one batch each: no line to draw)
    assert len(page.images) >= 4
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in page.images)
    assert "NVIDIA H100 80GB HBM3" in html and "580.159.04" in html and "sw_power_cap" in html
    assert "tileiras compile exceeded" in html and "TileGym is not installed" in html
    assert "### Each workload's own kernels against the other providers" in md
    # the fixture predates recorded hints: every provider but the baseline is the subject, and
    # the flag and word axes are the regimes (a verdict per model and mode)
    assert "| vs the baseline (native) | 3 | 13.96x faster | 5.41x faster at seq_len=256 |" in md
    assert "#### model_step (model=gpt2, mode=fwd)" in md
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
    assert ">detects<" in html and "&gt;= 3%<" in html  # the smallest change each row could catch


@pytest.mark.cpu
def test_fresh_cpu_run_renders(tmp_path, write_sweep, capsys):
    sweep = write_sweep("""
workload: fmha
baseline: native
providers: [native, sdpa-math, cutile]
axes: {batch: [1], heads: [1], seq_len: [16, 32], head_dim: [16], dtype: [float32], mode: [fwd]}
timing: {warmup_ms: 1, min_reps: 5, max_reps: 20, max_time_s: 0.05, timeout_s: 60}
""")
    assert run_main([str(sweep), "--out", str(tmp_path / "results")]) == 0
    capsys.readouterr()
    meta = json.loads((tmp_path / "results" / "latest" / "meta.json").read_text())
    assert meta["workloads"]["fmha"]["x_axes"] == ["seq_len"]  # the hints, recorded for the report
    page, html, md = render(tmp_path / "results" / "latest", tmp_path)
    assert SECTIONS | {"workload-fmha"} <= page.sections
    assert len(page.images) == 1  # sdpa-math's speedup over native along seq_len
    assert "skipped" in html and "cuTile not available" in html  # no GPU here
    assert "(cpu)" in md


def test_odd_runs_still_render(tmp_path):
    skipped = write_run(tmp_path / "skipped", [record("a", [], "skipped", workload="fmha", seq_len=s)
                                               for s in (64, 128)], gpu=None)
    page, html, _ = render(skipped, tmp_path)
    assert SECTIONS <= page.sections and "it was skipped" in html and page.images == []
    no_seq = write_run(tmp_path / "noseq", [record(p, [1.0, 1.1, 0.9], workload="gemm", m=m)
                                            for p in ("p", "q") for m in (1, 2)], gpu=None)
    page, html, _ = render(no_seq, tmp_path)  # no hints: x is the numeric axis that varies
    assert "workload-gemm" in page.sections and len(page.images) == 1
    one = write_run(tmp_path / "one", [record(p, [1.0, 1.1, 0.9], workload="gemm", m=1)
                                       for p in ("p", "q")], gpu=None)
    page, html, _ = render(one, tmp_path)  # nothing varies: q's speedup as a bar
    assert len(page.images) == 1
    alone = write_run(tmp_path / "alone", [record("p", [1.0], workload="gemm", m=m) for m in (1, 2)],
                      gpu=None)
    page, html, _ = render(alone, tmp_path)  # the baseline alone: no speedup to draw
    assert page.images == [] and "No plot" in html
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


HINTS = {"x_axes": ["seq_len"], "regimes": ["mode"], "panels": ["mode"], "subject": ["cutile"],
         "note": "Reported elsewhere: 2.8 ms, not this run's."}


def with_hints(run, workload="fmha", **changes):
    """The run as one recorded today: its meta names the workload's presentation hints."""
    meta = json.loads((run / "meta.json").read_text())
    meta["workloads"] = {workload: {**HINTS, **changes}}
    (run / "meta.json").write_text(json.dumps(meta))
    return run


def test_a_workloads_note_comes_from_its_recorded_hints(tmp_path):
    page, html, md = render(with_hints(fmha_run(tmp_path / "r", ["native", "cutile"])), tmp_path)
    assert "Reported elsewhere: 2.8 ms" in html.split('id="workload-fmha"')[1] and "2.8 ms" in md
    page, html, md = render(with_hints(fmha_run(tmp_path / "q", ["native", "cutile"]), note=""),
                            tmp_path)
    assert "2.8 ms" not in html and "2.8 ms" not in md


def test_a_run_without_its_subject_says_so_in_the_headline(tmp_path):
    page, html, md = render(with_hints(fmha_run(tmp_path / "none", ["native", "sdpa-flash"])), tmp_path)
    assert "cutile did not run: not part of this run." in md
    assert "cutile did not run" in html.split('id="headline"')[1].split("</section>")[0]
    page, html, md = render(with_hints(fmha_run(tmp_path / "skip", ["native", "cutile"], "skipped",
                                                "cuTile not available: no GPU")), tmp_path)
    assert "cutile did not run: skipped: cuTile not available: no GPU (2 cases)." in md


def test_zipped_axes_label_the_x_ticks(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(report.plots, "lines", lambda *a, **kw: drawn.append((a, kw)) or [])
    render(with_hints(fmha_run(tmp_path / "r", ["native", "cutile"])), tmp_path)
    # the speedup along the hinted x, batch (which changes with seq_len) under its ticks
    assert [(a[1], a[2], kw["zipped"], kw["ref"]) for a, kw in drawn] == [
        ("seq_len", "speedup", ["batch"], 1.0)]


def test_a_case_faster_than_its_ceiling_is_suspect_and_not_a_win(tmp_path):
    # 1 GB at a 1000 GB/s ceiling takes at least 1 ms: cutile's 0.5 ms is impossible
    recs = [{**record(p, [ms] * 3, workload="layernorm", hidden=768, dtype="float16"),
             "baseline": "torch", "bytes": 1e9} for p, ms in (("torch", 2.0), ("cutile", 0.5))]
    run = with_hints(write_run(tmp_path / "r", recs), "layernorm", x_axes=["hidden"])
    meta = json.loads((run / "meta.json").read_text())
    meta["ceilings"] = {"gpu": "GPU", "measured": {"copy_gbps": 1000.0, "tflops": {}}}
    (run / "meta.json").write_text(json.dumps(meta))
    page, html, md = render(run, tmp_path)
    assert ">suspect<" in html.split('id="table-layernorm"')[1]
    assert "cutile gave no usable time: suspect: faster than the measured ceiling (1 case)." in md
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


def test_a_report_never_writes_over_a_file_of_the_run(tmp_path, capsys):
    """`-o RUN/samples.jsonl` wrote the HTML over the run's records, and exited 0."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    before = (run / "samples.jsonl").read_bytes()
    assert exit_code(report_cli.main, [str(run), "-o", str(run / "samples.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a file of the run itself (samples.jsonl)" in err, err
    assert (run / "samples.jsonl").read_bytes() == before


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


def test_tuned_section_follows_the_results():
    text = (Path(report.TEMPLATES) / "report.html.j2").read_text()
    assert text.index('include "tuned.html.j2"') > text.index("{% for s in sections %}")


def test_presenter_names_no_workload_or_provider():
    """Workloads are plugins: the report lays them out from the hints a run recorded. A name that is
    also a key of the environment card (torch's version) is no provider there."""
    from bench import workloads
    env_keys = set(json.loads((FIXTURE / "meta.json").read_text())["env"])
    names = {n for w in workloads.names() for n in (w, *workloads.get(w).providers)} - env_keys
    assert {"fmha", "model_step", "cutile", "torch-naive", "tilegym"} <= names
    files = [*Path(report.__file__).parent.glob("*.py"), *Path(report.TEMPLATES).glob("*.j2")]
    found = [(f.name, n) for f in files for n in names
             if re.search(rf"""["'`]{re.escape(n)}["'`]|\b{re.escape(n)}\(""", f.read_text())]
    assert found == []


def test_a_suspect_case_is_never_best_nor_in_a_geomean(tmp_path, monkeypatch):
    """The fastest case at every shape is faster than the machine allows (here, the CPU's floor):
    no headline, speedup, plot or console table may name it best."""
    from bench.present import console
    from bench.results.summary import summarize
    floor = {"cpu": True, "measured": {"copy_gbps": 100.0, "tflops": {}}}  # 1 GB: >= 10 ms
    recs = [{**record(p, [ms] * 3, workload="w", size=n), "baseline": "base", "bytes": 1e9}
            for n in (1, 2) for p, ms in (("base", 40.0), ("mine", 20.0), ("rival", 1.0))]
    run = with_hints(write_run(tmp_path / "r", recs, gpu=None), "w", x_axes=["size"], regimes=[],
                     panels=[], subject=["mine"], note="")
    meta = json.loads((run / "meta.json").read_text())
    meta["ceilings"] = floor
    (run / "meta.json").write_text(json.dumps(meta))
    frame = summarize(recs, floor)
    assert frame.loc[frame.provider == "rival", "suspect"].all()  # 1 ms < 10 ms: impossible
    page, html, md = render(run, tmp_path)
    assert "| vs the baseline (base) | 2 | 2.00x faster |" in md  # mine: 40 / 20
    assert "| vs the best other provider | 2 | 2.00x faster |" in md  # rival left out: base is best
    assert "rival" not in html.split('id="headline"')[1].split("</section>")[0]
    table = console.best_table(frame, recs)
    assert [row for row in table.columns[table.columns.index(next(
        c for c in table.columns if c.header == "best"))].cells] == ["mine", "mine"]
    drawn = []
    monkeypatch.setattr(report.plots, "lines", lambda frame, *a, **kw: drawn.append(frame) or [])
    report.build(report.Run(run, meta, recs))
    assert drawn and not any((d["provider"] == "rival").any() for d in drawn)


def test_console_table_gives_every_providers_speedup_where_the_subject_loses():
    """The end-of-run table names the best provider per shape, and beside it every other correct
    provider's speedup, so that a kernel slower than the baseline still shows by how much."""
    from bench.present import console
    from bench.results.summary import summarize
    recs = [{**record(prov, [ms] * 3, n=n), "baseline": "p"}
            for n, times in ((1, (40.0, 50.0, 20.0)), (2, (40.0, 10.0, 20.0)))
            for prov, ms in zip(("p", "mine", "rival"), times)]
    recs.append({**record("broken", [1.0] * 3, status="incorrect", n=1), "baseline": "p"})
    recs += [{**record(prov, [ms] * 3, n=3), "baseline": "p"} for prov, ms in (("mine", 5.0), ("rival", 6.0))]
    table = console.best_table(summarize(recs), recs)
    cells = {c.header: list(c.cells) for c in table.columns}
    assert cells["best"] == ["rival", "mine", "mine"]
    assert cells["each provider"] == ["mine 0.80x, rival 2.00x", "mine 4.00x, rival 2.00x",
                                      "mine -, rival -"]  # no baseline at n=3: no speedups
    assert cells["speedup"] == ["2.00x", "4.00x", "-"]


def test_case_table_groups_shapes_in_hint_then_sweep_order(tmp_path):
    """Regimes first, then x by value, then the sweep's other axes; providers in the sweep's order
    (its cases.json), not the alphabet; one header row per shape."""
    recs = [{**record(p, [1.0], workload="w", seq=s, mode=m, batch=b), "baseline": "zeta"}
            for m in ("fwd_bwd", "fwd") for b, s in ((8, 1024), (1, 16384), (4, 127))
            for p in ("alpha", "zeta")]
    run = with_hints(write_run(tmp_path / "r", recs, gpu=None), "w", x_axes=["seq"],
                     regimes=["mode"], panels=["mode"], subject=["alpha"], note="")
    cases = [{"provider": p} for p in ("zeta", "alpha")]
    (run / "cases.json").write_text(json.dumps(cases))
    page, html, md = render(run, tmp_path)
    body = html.split('id="table-w"')[1].split("</table>")[0]
    groups = re.findall(r'<tr class="group"><th colspan="\d+">([^<]*)</th>', body)
    assert groups == [f"mode={m}, seq={s}, batch={b}" for m in ("fwd", "fwd_bwd")
                      for s, b in ((127, 4), (1024, 8), (16384, 1))]
    providers = re.findall(r'<tr><td data-sort="(alpha|zeta)"', body)
    assert providers == ["zeta", "alpha"] * 6


def test_noisy_is_explained_in_text_and_markdown(tmp_path):
    from bench.results import compare
    from bench.results.store import load_run
    noisy = [record("p", [1.0, 3.0, 0.3, 2.0, 0.5], n=1)]
    a = write_run(tmp_path / "a", noisy)
    b = write_run(tmp_path / "b", noisy)
    cmp = compare.compare_runs(*(load_run(x) for x in (a, b)))
    assert cmp.rows[0]["noisy"]
    for text in (compare.to_text(cmp), compare.to_markdown(cmp, only_changes=True)):
        assert '1 of 1 cases are "noisy"' in text and "not a regression and not a win" in text
    page, html, md = render(b, tmp_path, "--baseline", str(a))
    assert '1 of 1 cases are "noisy"' in md and '1 of 1 cases are &#34;noisy&#34;' in html
    quiet = write_run(tmp_path / "q", [record("p", [1.0] * 5, n=1)])
    assert compare.noisy_note(compare.compare_runs(*(load_run(x) for x in (quiet, quiet)))) == ""


def test_a_provider_keeps_its_colour_from_plot_to_plot():
    """The speedup plot leaves the baseline out and the ceiling plot keeps it: each provider is
    drawn in the same colour in both, and a provider the run did not list still gets one."""
    from bench.present import plots
    listed = ["native", "sdpa-flash", "cutile"]
    speedup, ceiling = plots._colours(listed, ["sdpa-flash", "cutile"]), plots._colours(listed, listed)
    assert speedup["cutile"] == ceiling["cutile"] and speedup["sdpa-flash"] == ceiling["sdpa-flash"]
    assert len(set(ceiling.values())) == 3
    assert plots._colours(listed, ["mine"])["mine"] not in ceiling.values()


def test_the_cases_that_left_their_worker_changed_are_named_with_the_restart_they_cost(monkeypatch):
    """By provider and what they changed, with the median gap to the next case on the same device
    (a fresh worker's start), in the report's environment card and at the end of a run."""
    import io

    from rich.console import Console

    from bench.present import console
    from bench.results.summary import fresh_workers, summarize

    def rec(provider, device, start, end, n, leaked=None):
        return {**record(provider, [1.0] * 3, n=n), "device": device, "leaked": leaked,
                "started_utc": f"2026-12-06T10:00:{start:06.3f}Z", "ended_utc": f"2026-12-06T10:00:{end:06.3f}Z"}
    records = [rec("p", "cuda:0", 0, 1, 1), rec("compile", "cuda:0", 1.2, 9, 1, {"environ": ["TRITON_CACHE_DIR"], "threads": [1, 3]}),
               rec("p", "cuda:1", 2, 3, 2), rec("compile", "cuda:1", 3.1, 4, 2, {"processes": [0, 1]}),
               rec("mine", "cuda:1", 10, 11, 2), rec("mine", "cuda:0", 17, 18, 1),
               rec("compile", "cuda:0", 18.1, 19, 3, {"environ": ["X"]})]
    line = ("3 of 7 cases (compile 3) changed environ (TRITON_CACHE_DIR, X); processes; threads; "
            "the next case began 8.0 s later (median), in a fresh worker")  # 8 s on cuda:0, 6 s on cuda:1
    assert fresh_workers(records) == line
    assert fresh_workers([r for r in records if not r["leaked"]]) is None
    shown = io.StringIO()
    monkeypatch.setattr(console, "out", Console(file=shown, width=400))
    console.report_end(summarize(records), records)
    assert f"cases that left their worker changed: {line}" in shown.getvalue()
