"""Render benchmark results: ``benchmarks/results/*.json`` → ``results/RESULTS.md`` and one PNG per
results file (time and peak extra memory per case), the training-step runs as tables, optionally into a
marked README section.

    python benchmarks/render.py                      # writes results/RESULTS.md and results/<id>.png
    python benchmarks/render.py --readme README.md   # also replaces <!-- bench:start --> … <!-- bench:end -->
                                                     # (protocol runs only; --readme may be repeated)
    python benchmarks/render.py --print              # prints the Markdown
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _fmt_time(s):
    if s is None:
        return "—"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_bytes(b):
    if b is None:
        return "—"
    if b >= 2**30:
        return f"{b / 2**30:.2f} GiB"
    return f"{b / 2**20:.1f} MiB"


def _fmt_ratio(r):
    return "—" if r is None else f"{r:.2f}×" if r >= 0.1 else f"{r:.3f}×"


def _size_label(c):
    return f"B=N={c['size']}" if c["op"] == "infonce" else f"n={c['size']}"


def load_results(results_dir: str, protocol_only: bool = False) -> list[tuple[str, dict]]:
    """Results files of a folder: protocol runs (benchmarks/protocol.py) and pytest-benchmark suite
    runs; noisy protocol runs are never rendered."""
    docs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        if path.endswith("-noisy.json") or path.endswith("-rehearsal.json"):
            continue
        with open(path) as f:
            doc = json.load(f)
        if not (isinstance(doc, dict) and "cases" in doc and "machine" in doc):
            continue
        if not (is_protocol(doc) or doc.get("kind")):
            continue  # rendered by its own benchmark's notes (e.g. the length-chunks A/B)
        if protocol_only and not (is_protocol(doc) or is_train_step(doc)):
            continue
        docs.append((path, doc))
    return docs


def is_protocol(doc: dict) -> bool:
    return str(doc.get("schema", "")).startswith("protocol")


def is_train_step(doc: dict) -> bool:
    return doc.get("kind") == "train-step"


# ---------------------------------------------------------------------------- training-step runs


def _rates(ceiling: dict, side: str) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in ((ceiling or {}).get(side, {}) or {}).get("gflops", {}).items())


def _case_bracket(c: dict) -> str:
    """A case's own ceiling bracket (schema 2): MKL sgemm before → after and the largest move."""
    ceil, moved = c.get("ceiling") or {}, c.get("ceiling_moved") or {}
    before = ((ceil.get("start") or {}).get("gflops") or {}).get("sgemm_mkl")
    after = ((ceil.get("end") or {}).get("gflops") or {}).get("sgemm_mkl")
    if before is None or after is None:
        return "—"
    # the rates that decide (protocol.judge_noise); files from before the gate was recorded: every rate
    gate = c.get("noise_gate") or list(moved)
    return f"{before:.0f} → {after:.0f} (max move {max((moved[k] for k in gate if k in moved), default=0):.0%})"


def train_step_markdown(doc: dict, stem: str) -> str:
    """One table per training-step results file (test_bench_train_step.py): sentences/s and peak RSS,
    reference vs fused loss, from the medians recorded. Schema 2 files merge quiet cases of several runs,
    each case with its own ceiling bracket; schema 1 files are one run with one bracket."""
    s = doc.get("settings", {})
    out = [f"### Training step: `{stem}`", "",
           f"Machine: {machine_line(doc)}; {s.get('threads')} threads, OpenMP wait policy "
           f"{s.get('omp_wait_policy')}. Step: {s.get('student')}, max length {s.get('max_length')}, {s.get('loss')}, "
           f"GradCache chunk {s.get('grad_cache_chunk')}, length chunk {s.get('length_chunk_size') or 'none (padded)'}, "
           f"{s.get('optimizer')}; median of {s.get('rounds')} interleaved rounds."]
    per_case = doc.get("schema") == 2
    if per_case:
        runs = doc.get("runs") or []
        out[-1] += (" Every case was timed between two measurements of the GEMM ceiling and is published only "
                    "if no GEMM rate moved by more than 20 % (column *ceiling*: MKL sgemm GFLOP/s before → after, and the "
                    "largest move of a GEMM rate). "
                    "Runs: " + "; ".join(f"{r.get('started_at')} → {r.get('finished_at', '(stopped)')}"
                                         + (f" ({r['note']})" if r.get("note") else "") for r in runs) + ".")
    else:
        moved = ", ".join(f"{k} {v:.0%}" for k, v in (doc.get("ceiling_moved") or {}).items())
        ceil = doc.get("ceiling", {})
        out[-1] += (f" Run {doc.get('started_at')} → {doc.get('finished_at')}; GEMM ceiling (GFLOP/s) start: "
                    f"{_rates(ceil, 'start')}; end: {_rates(ceil, 'end')} (moved: {moved or '—'}).")
        if doc.get("note"):
            out += ["", f"Note: {doc['note']}"]
    out.append("")
    header = ("| B | dtype | step, reference → fused loss | sentences/s, reference → fused | gain | loss alone, reference → fused "
              "| loss share of the reference step | peak RSS, reference → fused |")
    rule = "|---:|---|---:|---:|---:|---:|---:|---:|"
    if per_case:
        header, rule = header + " measured | ceiling |", rule + "---|---:|"
    out += [header, rule]
    peak = lambda p: (p.get("memory") or {}).get("peak_bytes")
    for c in doc.get("cases", []):
        ref, fused = c["peers"].get("reference", {}), c["peers"].get("cpu", {})
        if not ref.get("median_s") or not fused.get("median_s"):
            continue
        gain = ref["median_s"] / fused["median_s"] - 1
        row = (f"| {c['batch']} | {c['dtype']} | {_fmt_time(ref['median_s'])} → {_fmt_time(fused['median_s'])} "
               f"| {ref['sentences_per_s']:.1f} → {fused['sentences_per_s']:.1f} | {gain:+.1%} "
               f"| {_fmt_time(ref.get('loss_only_median_s'))} → {_fmt_time(fused.get('loss_only_median_s'))} "
               f"| {100 * (ref.get('loss_share') or 0):.1f}% | {_fmt_bytes(peak(ref))} → {_fmt_bytes(peak(fused))} |")
        if per_case:
            row += f" {str(c.get('measured_at', ''))[:16]} | {_case_bracket(c)} |"
        out.append(row)
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------- protocol runs

PEER_ORDER = ["eager", "compile", "gradcache", "fused"]


def _case_label(c: dict) -> str:
    return f"{c['op']} {'B=N' if c['op'] == 'infonce' else 'n'}={c['size']}, D={c['dim']}, {c['dtype']}"


def _pct(x):
    return "—" if x is None else f"{100 * x:.0f}%"


def protocol_markdown(doc: dict, stem: str, image_prefix: str) -> str:
    start = (doc["ceiling"].get("start") or {}).get("gflops") or {}
    end = (doc["ceiling"].get("end") or {}).get("gflops") or {}
    moved = doc.get("ceiling_moved") or {}
    gemm_info = (doc["ceiling"].get("start") or {}).get("gemm_info") or {}
    tile_route = "oneDNN" if gemm_info.get("onednn_active", True) else "ATen/MKL"  # older runs: oneDNN
    names = {"sgemm_mkl": "float32 torch.mm (MKL)", "sgemm_kernel_tile_gemm": f"float32 kernel tile GEMM ({tile_route})",
             "bf16_gemm_torch": "bf16 torch.mm (oneDNN)"}
    out = [f"### CPU protocol run: `{stem}`", ""]
    out.append(f"Machine: {machine_line(doc)}; {doc['threads']} threads; run {doc.get('started_at')} → "
               f"{doc.get('finished_at')}; {'**noisy**' if doc.get('noisy') else 'ceiling stable'}.")
    out.append("")
    out.append("GEMM ceiling at 4096×384 @ 384×4096 (GFLOP/s, start → end, moved): " + "; ".join(
        f"{names.get(k, k)} {start[k]:.0f} → {end.get(k, float('nan')):.0f} ({_pct(moved.get(k))})" for k in start))
    mem_start = (doc["ceiling"].get("start") or {}).get("memory_gbps") or {}
    mem_end = (doc["ceiling"].get("end") or {}).get("memory_gbps") or {}
    if mem_start:  # runs from 2026-12-04 on
        mem_names = {"stream_add": "c = a + b over touched 256 MiB", "fresh_alloc": "a fresh 256 MiB tensor filled"}
        out.append("")
        out.append("Memory ceiling (GB/s, start → end, moved): " + "; ".join(
            f"{mem_names.get(k, k)} {mem_start[k]:.1f} → {mem_end.get(k, float('nan')):.1f} ({_pct(moved.get(k))})"
            for k in mem_start))
    alloc = (doc.get("settings") or {}).get("allocator")
    if alloc:
        out.append("")
        out.append(f"Allocator: host THP `{alloc.get('host_thp')}`, children with THP_MEM_ALLOC_ENABLE="
                   f"{'1' if alloc.get('torch_thp_mem_alloc') else 'unset'}.")
    if doc.get("note"):  # written into the results file by hand, after the run (what the numbers alone hide)
        out += ["", f"Note: {doc['note']}"]
    out.append("")
    if doc.get("skipped"):
        out += ["Not measured: " + "; ".join(f"`{s['key']}` ({s['reason']})" for s in doc["skipped"]) + ".", ""]
    if doc.get("targets"):
        out += ["Targets (issue 14; fp32: default wait policy, the lead must also hold under PASSIVE):", "",
                "| case | fused vs | target | default | PASSIVE | result | memory fused/eager | target | result |",
                "|---|---|---:|---:|---:|---|---:|---:|---|"]
        for t in doc["targets"]:
            verdict = "not measured" if t.get("time_pass") is None else "**pass**" if t["time_pass"] else "**FAIL**"
            mem_t = f"≤ {t['max_mem_ratio']:.2f}×" if "max_mem_ratio" in t else ""
            mem_v = "" if "max_mem_ratio" not in t else "not measured" if t.get("mem_ratio") is None else (
                "**pass**" if t.get("mem_pass") else "**FAIL**")
            label = f"{t['op']} {'B=N' if t['op'] == 'infonce' else 'n'}={t['size']}, {t['dtype']}"
            out.append(f"| {label} | {t['vs']} | ≤ {t['max_time_ratio']:.2f}× | {_fmt_ratio(t.get('time_ratio_default'))} "
                       f"| {_fmt_ratio(t.get('time_ratio_PASSIVE'))} | {verdict} | {_fmt_ratio(t.get('mem_ratio'))} "
                       f"| {mem_t} | {mem_v} |")
        out.append("")
    out += ["| case | OMP wait policy | eager | torch.compile (compile time) | GradCache | fused | fused/eager "
            "| fused/compile | fused/GradCache | fused GFLOP/s | share of kernel GEMM ceiling | share of MKL sgemm |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in doc["cases"]:
        for policy, s in (c.get("summary") or {}).items():
            med = s["median_s"]
            comp = f"{_fmt_time(med.get('compile'))} ({_fmt_time(s.get('compile_s'))})" if "compile" in med else "—"
            vs = s["fused_vs"]
            out.append(
                f"| {_case_label(c)} | {policy} | {_fmt_time(med.get('eager'))} | {comp} | {_fmt_time(med.get('gradcache'))} "
                f"| {_fmt_time(med.get('fused'))} | {_fmt_ratio(vs.get('eager'))} | {_fmt_ratio(vs.get('compile'))} "
                f"| {_fmt_ratio(vs.get('gradcache'))} | {s['fused_gflops']:.0f} | {_pct(s['share_of_kernel_gemm_ceiling'])} "
                f"| {_pct(s['share_of_mkl_sgemm_ceiling'])} |")
    out.append("")
    out += ["Peak extra memory of one call (after warm-up; default policy):", "",
            "| case | eager | torch.compile | GradCache | fused | fused/eager |", "|---|---:|---:|---:|---:|---:|"]
    for c in doc["cases"]:
        m = {k: v.get("extra_bytes") for k, v in (c.get("memory") or {}).items() if "error" not in v}
        if not m:
            continue
        out.append(f"| {_case_label(c)} | {_fmt_bytes(m.get('eager'))} | {_fmt_bytes(m.get('compile'))} "
                   f"| {_fmt_bytes(m.get('gradcache'))} | {_fmt_bytes(m.get('fused'))} "
                   f"| {_fmt_ratio((c.get('memory_vs_eager') or {}).get('fused'))} |")
    out.append("")
    cross = doc.get("crossover_summary") or {}
    if cross:
        parts = []
        for op, v in cross.items():
            pts = ", ".join(f"{s}: {r:.2f}×" for s, r in v["ratios_fused_over_eager"])
            parts.append(f"{op}: fused faster from size {v['fused_faster_from_size']} (fused/eager by size: {pts})")
        out += ["Crossover (fp32, default policy; `backend=\"auto\"` uses the reference below it): " + "; ".join(parts), ""]
    out += [f"![{stem}]({image_prefix}{stem}.png)", ""]
    out.append("Protocol (benchmarks/README.md): each case and wait policy in a fresh process; every peer warmed up, "
               "then rounds that call every peer once in a rotating order; medians over rounds. Memory: one fresh "
               "process per case and peer, peak RSS of one call above the RSS before it, after a warm-up call. "
               "Ceiling: GEMM rates measured at the start and end of the run; a run whose ceiling moved by more "
               "than 20% is marked noisy and not rendered. GFLOP/s count the fused kernels' GEMM FLOPs as they "
               "perform them (InfoNCE 6·B·N·D; HSIC per tile pair of the upper triangle).")
    return "\n".join(out) + "\n"


def protocol_plot(doc: dict, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in doc["cases"] if (c.get("summary") or {}).get("default")]
    if not cases:
        return
    peers = [p for p in PEER_ORDER if any(p in c["summary"]["default"]["median_s"] for c in cases)]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(cases) + 2), 8), sharex=True)
    width = 0.8 / len(peers)
    for i, p in enumerate(peers):
        xs = [j + (i - (len(peers) - 1) / 2) * width for j in range(len(cases))]
        times = [c["summary"]["default"]["median_s"].get(p, 0) for c in cases]
        mems = [((c.get("memory") or {}).get(p) or {}).get("extra_bytes", 0) / 2**20 for c in cases]
        axes[0].bar(xs, times, width, label=p)
        axes[1].bar(xs, mems, width, label=p)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("median time, fwd+bwd (s), log")
    axes[1].set_yscale("symlog", linthresh=1)
    axes[1].set_ylabel("peak extra memory (MiB)")
    axes[1].set_xticks(range(len(cases)))
    axes[1].set_xticklabels([_case_label(c).replace(", ", "\n", 1) for c in cases], fontsize=8)
    axes[0].legend()
    axes[0].set_title(f"ibkd CPU protocol — {machine_line(doc)}, {doc['threads']} threads, default OMP wait policy",
                      fontsize=9)
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


PENDING = ("_The CPU numbers await a run of the benchmark protocol on a quiet machine "
           "(`python benchmarks/protocol.py --publish`, see benchmarks/README.md); earlier numbers were "
           "measured on a loaded machine and were removed._\n")


def machine_line(doc: dict) -> str:
    m = doc["machine"]
    isa = "".join(f", {m[k]}" for k in ("cpu_capability", "cpu_uarch") if m.get(k))
    parts = [f"{m.get('cpu_model')} ({m.get('cpu_count')} cores{isa}, {m.get('torch_threads')} torch threads)"]
    if m.get("gpu"):
        parts.insert(0, f"{m['gpu']} (driver {m.get('driver')}, CUDA {m.get('cuda')})")
    parts.append(f"torch {m.get('torch')}, triton {m.get('triton')}")
    return "; ".join(parts)


def results_table(doc: dict) -> str:
    rows = [
        "| op | shape | dtype | mode | backend | median | mean ± std | rounds | peak extra memory | time vs ref | memory vs ref | TFLOP/s |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in doc["cases"]:
        t, m, vs = c.get("time") or {}, c.get("memory") or {}, c.get("vs_reference") or {}
        status = "" if c.get("status") == "ok" else f" ({c.get('status')})"
        mem = _fmt_bytes(m.get("extra_bytes")) if "error" not in m else "error"
        tflops = f"{c['tflops']:.2f}" if c.get("tflops") else "—"
        rows.append(
            f"| {c['op']} | {_size_label(c)}, D={c['dim']} | {c['dtype']} | {c['mode']} | {c['backend']}{status} "
            f"| {_fmt_time(t.get('median_s'))} | {_fmt_time(t.get('mean_s'))} ± {_fmt_time(t.get('stddev_s'))} "
            f"| {t.get('rounds', '—')} | {mem} | {_fmt_ratio(vs.get('time_ratio'))} "
            f"| {_fmt_ratio(vs.get('mem_ratio'))} | {tflops} |"
        )
    return "\n".join(rows)


def targets_table(doc: dict) -> str:
    if not doc.get("targets"):
        return ""

    def verdict(ok):
        return "not measured" if ok is None else "**pass**" if ok else "**FAIL**"

    rows = [
        "| target | time cpu/ref | target | result | memory cpu/ref | target | result |",
        "|---|---:|---:|---|---:|---:|---|",
    ]
    for t in doc["targets"]:
        name = f"{t['op']} {'B=N' if t['op'] == 'infonce' else 'n'}={t['size']}, D={t['dim']}, {t['dtype']}, {t['mode']}"
        rows.append(
            f"| {name} | {_fmt_ratio(t.get('time_ratio'))} | ≤ {t['max_time_ratio']:.2f}× | {verdict(t.get('time_pass'))} "
            f"| {_fmt_ratio(t.get('mem_ratio'))} | ≤ {t['max_mem_ratio']:.2f}× | {verdict(t.get('mem_pass'))} |"
        )
    return "\n".join(rows)


def extra_section(doc: dict) -> str:
    lines = []
    for key, value in sorted((doc.get("extra") or {}).items()):
        lines.append(f"- `{key}`: {json.dumps(value)}")
    return "\n".join(lines)


def plot(doc: dict, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in doc["cases"] if c.get("status") == "ok" and c.get("time")]
    groups = list(dict.fromkeys(c["group"] for c in cases))
    backends = list(dict.fromkeys(c["backend"] for c in cases))
    by_key = {(c["group"], c["backend"]): c for c in cases}
    labels = []
    for g in groups:
        c = next(c for c in cases if c["group"] == g)
        labels.append(f"{c['op']} {c['size']}×{c['dim']}\n{c['dtype']} {c['mode']}")
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(groups) + 2), 8), sharex=True)
    width = 0.8 / max(1, len(backends))
    for i, b in enumerate(backends):
        xs = [j + (i - (len(backends) - 1) / 2) * width for j in range(len(groups))]
        times = [by_key[(g, b)]["time"]["median_s"] if (g, b) in by_key else 0 for g in groups]
        errs = [by_key[(g, b)]["time"]["stddev_s"] if (g, b) in by_key else 0 for g in groups]
        mems = [((by_key[(g, b)].get("memory") or {}).get("extra_bytes") or 0) / 2**20 if (g, b) in by_key else 0
                for g in groups]
        axes[0].bar(xs, times, width, yerr=errs, label=b)
        axes[1].bar(xs, mems, width, label=b)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("median time (s), log")
    axes[1].set_yscale("symlog", linthresh=1)
    axes[1].set_ylabel("peak extra memory (MiB), log")
    axes[1].set_xticks(range(len(groups)))
    axes[1].set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    axes[0].legend()
    axes[0].set_title(f"ibkd benchmarks — {machine_line(doc)}", fontsize=9)
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def render(results_dir: str, image_prefix: str = "", protocol_only: bool = False) -> str:
    """The Markdown for every results file; images are referenced as ``image_prefix + <stem>.png``."""
    docs = load_results(results_dir, protocol_only)
    if not docs:
        return PENDING if protocol_only else "_No benchmark results yet: run `python benchmarks/protocol.py`._\n"
    out = []
    legacy = False
    for path, doc in docs:
        stem = os.path.splitext(os.path.basename(path))[0]
        if is_protocol(doc):
            protocol_plot(doc, os.path.join(results_dir, stem + ".png"))
            out.append(protocol_markdown(doc, stem, image_prefix))
            continue
        if is_train_step(doc):
            out.append(train_step_markdown(doc, stem))
            continue
        legacy = True
        plot(doc, os.path.join(results_dir, stem + ".png"))
        out.append(f"### {doc['kind'].upper()}: `{stem}`\n")
        out.append(f"Machine: {machine_line(doc)}. Written {doc.get('written_at')}.")
        if doc.get("note"):
            out.append(f"Note: {doc['note']}")
        out.append("")
        targets = targets_table(doc)
        if targets:
            out += ["Targets (foundation issue):", "", targets, ""]
        out += [results_table(doc), ""]
        extra = extra_section(doc)
        if extra:
            out += [extra, ""]
        out += [f"![{stem}]({image_prefix}{stem}.png)", ""]
    if not legacy:
        return "\n".join(out) + "\n"
    out.append("pytest-benchmark suite: time: median over the timed rounds (CPU: `time.perf_counter` via pytest-benchmark; "
               "GPU: CUDA events via `triton.testing.do_bench`). Peak extra memory: CPU, peak RSS (`VmHWM`) of a "
               "child that runs the call minus that of a child that only builds the inputs; GPU, "
               "`torch.cuda.max_memory_allocated` above the allocation before the call. "
               "Ratios are backend / reference for the same case.")
    return "\n".join(out) + "\n"


def replace_section(readme_path: str, body: str) -> None:
    """Replace the lines between the marker lines (each marker alone on its line, so a marker quoted
    inside prose or code is left alone)."""
    with open(readme_path) as f:
        lines = f.read().split("\n")
    stripped = [line.strip() for line in lines]
    if START not in stripped or END not in stripped[stripped.index(START):]:
        raise SystemExit(f"{readme_path}: needs a section between the lines {START} and {END}")
    start = stripped.index(START)
    end = stripped.index(END, start)
    new = lines[: start + 1] + body.rstrip("\n").split("\n") + lines[end:]
    with open(readme_path, "w") as f:
        f.write("\n".join(new))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=os.path.join(HERE, "results"), help="folder of results JSON files")
    p.add_argument("--readme", action="append", default=[],
                   help="also replace the marked bench section of this Markdown file (repeatable)")
    p.add_argument("--print", action="store_true", help="print the Markdown")
    args = p.parse_args(argv)
    body = render(args.results)
    out_md = os.path.join(args.results, "RESULTS.md")
    with open(out_md, "w") as f:
        f.write("# ibkd benchmark results\n\nGenerated by `python benchmarks/render.py` from the JSON files here.\n\n" + body)
    print(f"wrote {out_md}", file=sys.stderr)
    for readme in args.readme:
        prefix = os.path.relpath(args.results, os.path.dirname(os.path.abspath(readme))) + "/"
        # the READMEs show protocol runs only (interleaved, ceiling-checked), never suite runs
        replace_section(readme, render(args.results, image_prefix=prefix, protocol_only=True))
        print(f"updated {readme}", file=sys.stderr)
    if args.print:
        print(body)


if __name__ == "__main__":
    main()
