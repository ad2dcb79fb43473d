"""Render benchmark results: ``benchmarks/results/*.json`` → ``results/RESULTS.md`` and one PNG per
results file (time and peak extra memory per case), optionally into a marked README section.

    python benchmarks/render.py                      # writes results/RESULTS.md and results/<id>.png
    python benchmarks/render.py --readme README.md   # also replaces <!-- bench:start --> … <!-- bench:end -->
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


def load_results(results_dir: str) -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            doc = json.load(f)
        if isinstance(doc, dict) and "cases" in doc and "machine" in doc:
            docs.append((path, doc))
    return docs


def machine_line(doc: dict) -> str:
    m = doc["machine"]
    parts = [f"{m.get('cpu_model')} ({m.get('cpu_count')} cores, {m.get('torch_threads')} torch threads)"]
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


def render(results_dir: str, image_prefix: str = "") -> str:
    """The Markdown for every results file; images are referenced as ``image_prefix + <stem>.png``."""
    docs = load_results(results_dir)
    if not docs:
        return "_No benchmark results yet: run `pytest benchmarks/`._\n"
    out = []
    for path, doc in docs:
        stem = os.path.splitext(os.path.basename(path))[0]
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
    out.append("Time: median over the timed rounds (CPU: `time.perf_counter` via pytest-benchmark; "
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
    p.add_argument("--readme", help="also replace the marked bench section of this Markdown file")
    p.add_argument("--print", action="store_true", help="print the Markdown")
    args = p.parse_args(argv)
    body = render(args.results)
    out_md = os.path.join(args.results, "RESULTS.md")
    with open(out_md, "w") as f:
        f.write("# ibkd benchmark results\n\nGenerated by `python benchmarks/render.py` from the JSON files here.\n\n" + body)
    print(f"wrote {out_md}", file=sys.stderr)
    if args.readme:
        prefix = os.path.relpath(args.results, os.path.dirname(os.path.abspath(args.readme))) + "/"
        replace_section(args.readme, render(args.results, image_prefix=prefix))
        print(f"updated {args.readme}", file=sys.stderr)
    if args.print:
        print(body)


if __name__ == "__main__":
    main()
