"""Rendering the results document: the Markdown tables (reproduction, sweep, GPU timing, embedding
tables and the compact student), the figure, and the two README sections between their marker lines.
Everything here reads the document only, so ``--render-only`` redraws from the JSON."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

from ...distill.plotting import figure
from ..embedding import render_markdown
from .spec import ReproduceError

REPRODUCE_MARKERS = ("<!-- reproduce:start -->", "<!-- reproduce:end -->")
EMBEDDING_MARKERS = ("<!-- embedding:start -->", "<!-- embedding:end -->")


def _f(v, digits=2) -> str:
    return "—" if not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _ms(stat: Optional[dict], digits=2) -> str:
    if not stat or stat.get("mean") is None:
        return "—"
    if stat.get("std") is None:
        return _f(stat["mean"], digits)
    return f"{_f(stat['mean'], digits)} ± {_f(stat['std'], digits)}"


def _restored(doc: dict) -> str:
    """Which rows came from a published run (``--reuse_results``), and the commits they ran at."""
    rows = [r for r in doc.get("rows", []) if r.get("restored_from")]
    if not rows:
        return ""
    commits = sorted({str(r["restored_from"].get("git_commit")) for r in rows})
    files = sorted({str(r["restored_from"].get("file")) for r in rows})
    return (f"; {len(rows)} of them restored from the published {', '.join(files)} (same settings hash; run at commit "
            f"{', '.join(commits)}): {', '.join(r['name'] for r in rows)}")


def _signed(stat: dict) -> str:
    if not stat or stat.get("mean") is None:
        return "—"
    return f"{stat['mean']:+.2f}" + (f" ± {stat['std']:.2f}" if stat.get("std") is not None else "")


def _params(n) -> str:
    if not isinstance(n, (int, float)):
        return "—"
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _workers(settings: dict) -> str:
    n, threads = settings.get("workers") or 1, settings.get("num_threads")
    if n == 1:
        return ""
    return f"; {n} rows at a time" + (f", {max(1, threads // n)} thread(s) each" if threads else "")


def _duration(s) -> str:
    if not isinstance(s, (int, float)):
        return "—"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


ROW_TITLES = {"teacher": "teacher", "none": "student, untrained", "mse": "student, MSE (ibkd)",
              "st_mse": "student, MSE (sentence-transformers)", "contrastive": "student, contrastive only",
              "ibkd": "student, IBKD", "auto": "student, IBKD β=auto", "finetune": "student, IBKD + stage 2",
              "compact": "compact student, IBKD", "model2vec": "Model2Vec (static)"}


def render_reproduce(doc: dict, image: Optional[str]) -> str:
    s = doc["settings"]
    env = doc["environment"]
    out = []
    if doc.get("quick"):
        out += ["**Quick smoke run** (tiny step counts and data limits): these numbers say only that the pipeline "
                "runs.", ""]
    layers = s["student_layers"]
    out.append(f"Teacher `{s['teacher']}`; students keep teacher layers {{{layers}}}. Stage 1: {s['steps']} steps × "
               f"batch {s['batch_size']}, lr {s['lr']:g}, max length {s['max_length']}, the same data order per seed "
               f"for every method; seeds {', '.join(map(str, s['seeds']))} for the MSE, contrastive and IBKD rows "
               f"(mean ± sample std), the first seed elsewhere. STS-B Spearman ×100 of cosine; the IBKD setting was chosen on "
               f"**dev** only.")
    out += ["", "| row | method / setting | seeds | STS-B dev | STS-B test | params | dim | encode (sent/s) | train time |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    by_row = {line["row"]: line for line in doc["summary"]}
    # β=auto chosen on dev: the IBKD line is the auto rows themselves, shown once
    auto_is_ibkd = "ibkd" in by_row and by_row["ibkd"]["runs"] == by_row.get("auto", {}).get("runs")
    for line in doc["summary"]:
        if line["row"] == "auto" and auto_is_ibkd:
            continue
        title = ROW_TITLES.get(line["row"], line["row"])
        if line["row"] == "compact" and line.get("d_small"):
            title += f" (table d={line['d_small']})"
        if line["row"] == "ibkd" and auto_is_ibkd:
            title += " (β=auto, the dev choice)"
        seeds = len(line["runs"]) if line["row"] not in ("teacher", "none") else "—"
        label = line.get("label") or "—"
        frozen = (by_row["auto"] if line["row"] == "ibkd" and auto_is_ibkd else line).get("chosen_beta") or {}
        if line["row"] in ("auto", "ibkd") and frozen.get("values"):
            label += "; β frozen at " + ", ".join(f"{v:.3g}" for v in frozen["values"])
        train = _ms(line["train_seconds"], 0)
        if line["train_seconds"].get("mean") is not None:
            train = _duration(line["train_seconds"]["mean"]) + (" per seed" if line["train_seconds"]["n"] > 1 else "")
        out.append(f"| {title} | {label} | {seeds} | {_ms(line['dev_spearman'])} "
                   f"| {_ms(line['test_spearman'])} | {_params(line['parameters'])} | {line.get('embedding_dim') or '—'} "
                   f"| {_ms(line['sentences_per_second'], 0)} | {train} |")
    out += ["", "Targets (reported against, not tuned towards):", ""] + render_targets(doc["targets"])
    out += ["", render_sweep(doc), ""]
    for part in (render_study(doc), render_stage2(doc)):
        if part:
            out += [part, ""]
    if image:
        out += [f"![loss curves and β sweep]({image})", ""]
    skipped = doc.get("skipped") or []
    if skipped:
        out.append("Not in this run: " + "; ".join(f"`{r['name']}` ({r['reason']})" for r in skipped) + ".")
        out.append("")
    gpu = doc.get("gpu_timing") or {}
    out.append(render_gpu(gpu))
    out += ["", f"Machine: {env.get('cpu')} ({env.get('cpu_count')} cores, {env.get('torch_threads')} torch threads), "
            f"torch {env.get('torch')}, transformers {env.get('transformers')}; commit {env.get('git_commit')}. "
            f"Command: `{env.get('command')}`; wall time {_duration(doc.get('wall_seconds'))} "
            f"(row compute {_duration(doc.get('compute_seconds'))}, including rows reused from an earlier invocation"
            f"{_workers(s)}){_restored(doc)}. "
            f"Encode throughput: the better of the STS-B dev and test passes (batch "
            f"{s.get('eval_batch_size') or 128}, tokenization included) on a shared machine; compare it within a run."]
    if env.get("note"):  # an annotation of the run (e.g. other load on the machine), kept in the results JSON
        out += ["", f"Note: {env['note']}"]
    return "\n".join(out) + "\n"


def _verdict(ok) -> str:
    return "met" if ok else "**not met**"


def render_targets(t: dict) -> list[str]:
    """One line per target with the numbers and met / not met."""
    out = []
    if "final_over_teacher" in t:
        which = "IBKD + stage 2" if t.get("final_row") == "finetune" else "IBKD, stage 1"
        why = ""
        if t.get("stage2_minus_stage1_dev") is not None:
            why = f"; stage 2 {'kept' if t['final_row'] == 'finetune' else 'left out'}: {t['stage2_minus_stage1_dev']:+.2f} on dev"
        out.append(f"- 2-layer student ({which}{why}) test {_f(t['final_test_mean'])} = "
                   f"{100 * t['final_over_teacher']:.1f}% of the teacher's {_f(t['teacher_test'])} (target ≥ "
                   f"{100 * t['teacher_fraction']:.0f}%): {_verdict(t['teacher_fraction_met'])}.")
    for peer, name in (("st_mse", "sentence-transformers' MSE recipe"), ("mse", "ibkd's MSE")):
        if f"ibkd_minus_{peer}" in t:
            ibkd = _ms({"mean": t["ibkd_test_mean"], "std": t.get("ibkd_test_std")})
            other = _ms({"mean": t[f"{peer}_test_mean"], "std": t.get(f"{peer}_test_std")})
            out.append(f"- IBKD (stage 1) {ibkd} − {name} {other} on test ({t.get('seeds_n')} seeds, mean ± std): "
                       f"{t[f'ibkd_minus_{peer}']:+.2f} points (target ≥ +{t['over_mse']:.1f}): "
                       f"{_verdict(t[f'over_{peer}_met'])}.")
    if "auto_minus_best_fixed_dev" in t:
        out.append(f"- IBKD β=auto vs the chosen setting on dev (means over seeds): {t['auto_minus_best_fixed_dev']:+.2f} "
                   f"points (target ≥ −{t['auto_within']:.2f}): {_verdict(t['auto_within_met'])}.")
    if "auto_minus_contrastive_dev" in t:
        out.append(f"- IBKD β=auto vs β=0 on dev (means over seeds): {t['auto_minus_contrastive_dev']:+.2f} points "
                   f"(target ≥ +{t['auto_over_contrastive']:.1f}): {_verdict(t['auto_over_contrastive_met'])}.")
    if t.get("compact_test_met") is not None:
        out.append(f"- compact student: test {_f(t['compact_test'])} (target ≥ {t['compact_test_target']:g}): "
                   f"{_verdict(t['compact_test_met'])}; {_params(t['compact_parameters'])} parameters (target ≤ "
                   f"{_params(t['compact_parameters_target'])}): {_verdict(t['compact_size_met'])}.")
    if "compact_minus_model2vec" in t:
        out.append(f"- compact student vs Model2Vec ({_params(t.get('model2vec_parameters'))}) on test: "
                   f"{t['compact_minus_model2vec']:+.2f} points: {_verdict(t['compact_over_model2vec_met'])}.")
    if "study_config_best_met" in t:
        best = "the config's own" if t["study_config_best_met"] else f"**{t['study_best_dev']}**, not the config's"
        out.append(f"- stage-1 settings (layers kept, lr, max length, ...): best on dev among the studied: {best}.")
    return out or ["- not measured (rows missing)."]


def _change(change: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in (change or {}).items()) or "—"


def render_study(doc: dict) -> str:
    study = doc.get("study") or {}
    if not study.get("candidates"):
        return ""
    out = ["Stage-1 settings against one change each (IBKD β=auto, first seed; chosen by dev):", "",
           "| setting | change | dev | test |", "|---|---|---:|---:|"]
    for c in study["candidates"]:
        name = "the config's" if c["name"] == "config" else c["name"]
        if c["name"] == study.get("best_dev"):
            name = f"**{name}** (best dev)"
        out.append(f"| {name} | {_change(c.get('change'))} | {_f(c['dev_spearman'])} | {_f(c['test_spearman'])} |")
    conf = study.get("confirmation")
    if conf:
        verdict = ("it is better: the config trails it" if study.get("best_dev") == conf["name"]
                   else "no evidence that it is better: the config's setting stays")
        diff = conf.get("paired_dev_difference") or {}
        test = (f"; paired by seed {_signed(diff)}, one-sided paired t-test p = {conf['p_value']:.2g} (a change is "
                f"adopted at p < {conf['alpha']:g})" if conf.get("p_value") is not None else "")
        out += ["", f"{conf['name']} led at the first seed, so it ran at seeds {', '.join(map(str, conf['seeds']))}: "
                    f"dev {_ms(conf['dev'])} (test {_ms(conf['test'])}) against the config's own β=auto rows, dev "
                    f"{_ms(conf['config_dev'])} (test {_ms(conf['config_test'])}){test}: {verdict}."]
    return "\n".join(out)


def render_stage2(doc: dict) -> str:
    st = doc.get("stage2") or {}
    settings = st.get("settings") or []
    if len(settings) < 2:
        return ""
    out = ["Stage 2 on STS-B train from the chosen first-seed student (chosen by dev; ‖∇β·HSIC‖/‖∇InfoNCE‖ as in the "
           "sweep):", "", "| setting | dev | test | ‖∇β·HSIC‖/‖∇InfoNCE‖ |", "|---|---:|---:|---:|"]
    for r in settings:
        if r.get("status") != "done":
            out.append(f"| {r.get('stage2_name') or r.get('name')} | {r.get('status')} | | |")
            continue
        name = r.get("stage2_name") or r["name"]
        if r["name"] == st.get("chosen"):
            name = f"**{name}** (chosen)"
        ratio = (r.get("curve_stats") or {}).get("grad_ratio_hsic_infonce")
        out.append(f"| {name} | {_f(r.get('dev_spearman'))} | {_f(r.get('test_spearman'))} "
                   f"| {'—' if ratio is None else f'{ratio:.3g}'} |")
    return "\n".join(out)


def render_sweep(doc: dict) -> str:
    sw = doc["sweep"]
    out = ["IB-term sweep (first seed, chosen by dev). ‖∇β·HSIC‖/‖∇InfoNCE‖: the two terms' gradient norms at "
           "the student output, mean over steps; at ratios far below 1 the HSIC term cannot change the student.", "",
           "| setting | dev | test | ‖∇β·HSIC‖/‖∇InfoNCE‖ | HSIC first → last |", "|---|---:|---:|---:|---:|"]
    if sw.get("contrastive_dev") is not None:
        crow = next((r for r in doc["rows"] if r["group"] == "contrastive" and r.get("status") == "done"), {})
        out.append(f"| β=0 (contrastive only) | {_f(sw['contrastive_dev'])} | {_f(crow.get('test_spearman'))} | 0 | — |")
    for r in sw["settings"]:
        if r.get("status") != "done":
            out.append(f"| {r.get('label')} | {r.get('status')} | | | |")
            continue
        cs = r.get("curve_stats") or {}
        label = r.get("label")
        if r["name"] == sw.get("chosen"):
            label = f"**{label}** (chosen)"
        ratio = cs.get("grad_ratio_hsic_infonce")
        out.append(f"| {label} | {_f(r.get('dev_spearman'))} | {_f(r.get('test_spearman'))} "
                   f"| {'—' if ratio is None else f'{ratio:.3g}'} "
                   f"| {_g(cs.get('hsic_first'))} → {_g(cs.get('hsic_last'))} |")
    gain = sw.get("best_minus_contrastive_dev")
    if gain is not None:
        out.append("")
        if gain > 0:
            out.append(f"Best IBKD setting vs contrastive only on dev: {gain:+.2f} points.")
        else:
            out.append(f"No IBKD setting beat contrastive-only distillation on dev (best {gain:+.2f} points): in this "
                       f"setup the information-bottleneck term did not help.")
    return "\n".join(out)


def _g(v) -> str:
    return "—" if not isinstance(v, (int, float)) else f"{v:.3g}"


def render_gpu(gpu: dict) -> str:
    if gpu.get("status") != "done":
        return f"GPU step timing (fused vs reference losses, bf16): {gpu.get('status', 'skipped')}" + (
            f" — {gpu['reason']}." if gpu.get("reason") else ".")
    out = [f"GPU step timing on {gpu.get('device')} (seconds per distillation step, median):", "",
           "| batch | " + " | ".join(sorted({r['backend'] for r in gpu['rows']})) + " |",
           "|---:|" + "---:|" * len({r['backend'] for r in gpu['rows']})]
    backends = sorted({r["backend"] for r in gpu["rows"]})
    for b in sorted({r["batch_size"] for r in gpu["rows"]}):
        cells = []
        for be in backends:
            rec = next((r for r in gpu["rows"] if r["batch_size"] == b and r["backend"] == be), {})
            cells.append(_f(rec.get("median_s"), 3) if rec.get("status") == "ok" else rec.get("status", "—"))
        out.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def render_embedding(doc: dict) -> str:
    emb = doc.get("embedding") or {}
    out = []
    if isinstance(emb, dict) and emb.get("rows"):
        out += ["Word-embedding tables for STS-B (siamese mean of word vectors → task network): distilled by "
                "encoding from the teacher's table (Mou et al., 2016) vs trained directly, "
                "`ibkd.experiments.embedding.compare_embeddings` with the budget of the reproduce config.", "",
                render_markdown(emb).rstrip("\n")]
    else:
        out.append(f"Embedding-table comparison: {emb.get('status', 'not run')}"
                   + (f" — {emb['reason']}." if emb.get("reason") else "."))
    by = {line["row"]: line for line in doc["summary"]}
    pair = [by[k] for k in ("finetune", "ibkd", "compact", "model2vec") if k in by]
    out += ["", "Compact factorized student (embedding table d_small + up-projection, teacher layers kept) beside the "
            "2-layer IBKD students and Model2Vec's static distillation of the same teacher (settings as in the "
            "reproduction table):", ""]
    if "compact" not in by:
        reason = next((r.get("reason") for r in doc["rows"] if r["name"] == "compact-ibkd"), None)
        out.append(f"_not available: {reason or 'not run'}_")
    else:
        out += ["| student | params | embedding table | encode (sent/s) | STS-B dev | STS-B test |",
                "|---|---:|---|---:|---:|---:|"]
        for line in pair:
            table = (f"d={line['d_small']}" if line.get("d_small") else "static, no layers" if line["row"] == "model2vec"
                     else f"full ({line.get('embedding_dim')})")
            out.append(f"| {ROW_TITLES[line['row']]} | {_params(line['parameters'])} | {table} "
                       f"| {_ms(line['sentences_per_second'], 0)} | {_ms(line['dev_spearman'])} | {_ms(line['test_spearman'])} |")
    return "\n".join(out) + "\n"


def plot(doc: dict, png_path: Path) -> None:
    """Loss curves per row and the sweep (dev Spearman vs β)."""
    rows = [r for r in doc["rows"] if r.get("status") == "done" and r.get("curve")]
    title = "ibkd reproduce" + (" (quick smoke run)" if doc.get("quick") else "")
    with figure(png_path, 2, 3, figsize=(17, 9), title=title) as axes:
        ax = axes[0, 0]
        for r in rows:
            c = r["curve"]
            if c.get("infonce") and r["group"] != "finetune":
                ax.plot(c["step"], c["infonce"], label=r["name"], lw=1.6 if r["group"] != "sweep" else 1.0,
                        ls="-" if r["group"] != "sweep" else "--")
        ax.set_title("stage 1: InfoNCE term per step")
        ax = axes[0, 1]
        for r in rows:
            c = r["curve"]
            if c.get("mse"):
                ax.plot(c["step"], c["mse"], label=r["name"])
        ax.set_title("stage 1: MSE baseline per step")
        ax = axes[0, 2]
        for r in rows:
            if r["group"] == "finetune":
                for key in ("loss", "infonce", "hsic"):
                    if r["curve"].get(key):
                        ax.plot(r["curve"]["step"], r["curve"][key], label=f"{r['name']} {key}")
        ax.set_title("stage 2 (STS-B train): loss terms per step")
        ax = axes[1, 0]
        for r in rows:
            c = r["curve"]
            if c.get("hsic"):
                ax.plot(c["step"], c["hsic"], label=r["name"])
        ax.set_title("HSIC(x, s) per step (unweighted)")
        ax.set_yscale("log")
        ax = axes[1, 1]
        for r in rows:
            c = r["curve"]
            if c.get("grad_norm_hsic") and c.get("grad_norm_infonce") and r["group"] != "finetune":
                ratio = [h / i if i else float("nan") for h, i in zip(c["grad_norm_hsic"], c["grad_norm_infonce"])]
                ax.plot(c["step"], ratio, label=r["name"])
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_title("‖∇β·HSIC‖ / ‖∇InfoNCE‖ at the student output")
        _plot_sweep(axes[1, 2], doc)
        for a in axes.flat:
            if a is not axes[1, 2]:
                a.set_xlabel("step")
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize=7)
            a.grid(alpha=0.3)


def _plot_sweep(ax, doc: dict) -> None:
    families: dict = {}
    for r in doc["sweep"]["settings"]:
        if r.get("status") != "done":
            continue
        st = r.get("setting") or {}
        fam = f"γ={st.get('gamma', 'default')}, {'unit-norm' if st.get('normalize_hsic_inputs', True) else 'raw'} HSIC"
        beta = st.get("beta")
        if isinstance(beta, (int, float)) and beta > 0:
            families.setdefault(fam, []).append((beta, r["dev_spearman"]))
    for fam, pts in families.items():
        pts.sort()
        ax.plot(*zip(*pts), "o-", label=fam)
    refs = {line["row"]: line["dev_spearman"]["mean"] for line in doc["summary"]}
    for name, color in (("contrastive", "black"), ("mse", "tab:red"), ("none", "tab:gray"), ("teacher", "tab:green")):
        if refs.get(name) is not None:
            ax.axhline(refs[name], color=color, ls=":", label=f"{name} (dev)")
    ax.set_xscale("log")
    ax.set_xlabel("β")
    ax.set_ylabel("STS-B dev Spearman ×100")
    ax.set_title("sweep: dev Spearman vs β (chosen by dev)")


def replace_between(text: str, markers: tuple, body: str, where: str = "README") -> str:
    """``text`` with the lines between the two marker lines (each alone on its line) replaced by ``body``;
    everything else byte for byte the same."""
    start_m, end_m = markers
    lines = text.split("\n")
    stripped = [ln.strip() for ln in lines]
    if start_m not in stripped:
        raise ReproduceError(f"{where}: no line {start_m}")
    start = stripped.index(start_m)
    if end_m not in stripped[start + 1:]:
        raise ReproduceError(f"{where}: no line {end_m} after {start_m}")
    end = stripped.index(end_m, start + 1)
    return "\n".join(lines[:start + 1] + body.rstrip("\n").split("\n") + lines[end:])


def write_outputs(doc: dict, results_path: Path, readme: Optional[Path]) -> str:
    """Markdown (``<results>.md``), PNG (``<results>.png``) and the two README sections, all rendered from
    ``doc``; returns the Markdown to print: the README's text when there is one (the Markdown file differs
    only in the image path, relative to where each file lives)."""
    results_path = Path(results_path)
    png = results_path.with_suffix(".png")
    md_path = results_path.with_suffix(".md")
    plot(doc, png)
    embedding_md = render_embedding(doc)

    def page(image: str) -> str:
        return ("## Reproduction\n\n" + render_reproduce(doc, image)
                + "\n## Embedding distillation and the compact student\n\n" + embedding_md)

    markdown = page(os.path.relpath(png, md_path.parent))
    md_path.write_text(markdown)
    if readme is None:
        return markdown
    readme = Path(readme)
    image = os.path.relpath(png, readme.parent)
    text = readme.read_text()
    text = replace_between(text, REPRODUCE_MARKERS, render_reproduce(doc, image), str(readme))
    text = replace_between(text, EMBEDDING_MARKERS, embedding_md, str(readme))
    readme.write_text(text)
    return page(image)
