"""bench.py's reports: step-time ratios to the switches-off rows, and the Markdown and JSON files."""
from __future__ import annotations

import json
import os
import statistics
import subprocess

from benchmarks import reference


def ratio_rows(rows: list[dict]) -> list[dict]:
    """Step-time ratio of every switch set to none, per (model, latent, precision, compile), with the
    paired-round medians and best-of-rounds ratios of interleaved runs, and the paper's code's ratio."""
    out = []
    groups = {}
    for r in rows:
        if "error" in r or "train_img_s" not in r:
            continue
        groups.setdefault((r["model"], r["latent"], r["precision"], r["compile"]), {})[r["switches"]] = r
    for (model, latent, prec, comp), by in groups.items():
        if "none" not in by:
            continue
        none = by["none"]
        for label, r in by.items():
            if label == "none":
                continue
            entry = {"model": model, "latent": latent, "precision": prec, "compile": comp,
                     "compile_mode": none.get("compile_mode"), "switches": label,
                     "train_ratio": none["train_img_s"] / r["train_img_s"],
                     "fwd_ratio": none["fwd_img_s"] / r["fwd_img_s"]}
            rounds_none, rounds_r = none.get("train_step_ms_rounds", []), r.get("train_step_ms_rounds", [])
            if len(rounds_none) > 1 and len(rounds_none) == len(rounds_r):
                entry["train_ratio_paired_median"] = statistics.median(a / b for a, b in zip(rounds_r, rounds_none))
                entry["train_ratio_rounds"] = [a / b for a, b in zip(rounds_r, rounds_none)]
                fr_none, fr_r = none["fwd_ms_rounds"], r["fwd_ms_rounds"]
                entry["fwd_ratio_paired_median"] = statistics.median(a / b for a, b in zip(fr_r, fr_none))
                # Best of the rounds: interference on a shared machine only ever adds time.
                entry["train_ratio_min"] = min(rounds_r) / min(rounds_none)
                entry["fwd_ratio_min"] = min(fr_r) / min(fr_none)
            ref = reference.mapdit_ratios(model, none["size"], label, none["channels"])
            if ref:
                entry["ref_train_ratio"], entry["ref_fwd_ratio"] = ref
            out.append(entry)
    return out


def compile_ratio_rows(rows: list[dict]) -> list[dict]:
    """Step time of each compiled row ÷ its eager twin (same model, latent, precision and switches), with
    the median of paired rounds when both were timed in the same interleaved rounds."""
    eager = {(r["model"], r["latent"], r["precision"], r["switches"]): r for r in rows
             if not r["compile"] and "train_img_s" in r and "error" not in r}
    out = []
    for r in rows:
        e = eager.get((r["model"], r["latent"], r["precision"], r["switches"]))
        if not r["compile"] or e is None or "train_img_s" not in r or "error" in r:
            continue
        entry = {"model": r["model"], "latent": r["latent"], "precision": r["precision"], "switches": r["switches"],
                 "compile": True, "compile_mode": r.get("compile_mode"),
                 "train_ratio": e["train_img_s"] / r["train_img_s"], "fwd_ratio": e["fwd_img_s"] / r["fwd_img_s"]}
        rounds_c, rounds_e = r.get("train_step_ms_rounds", []), e.get("train_step_ms_rounds", [])
        if len(rounds_c) > 1 and len(rounds_c) == len(rounds_e):
            entry["train_ratio_paired_median"] = statistics.median(c / x for c, x in zip(rounds_c, rounds_e))
            entry["fwd_ratio_paired_median"] = statistics.median(
                c / x for c, x in zip(r["fwd_ms_rounds"], e["fwd_ms_rounds"]))
        out.append(entry)
    return out


def compile_label(row: dict) -> str:
    """off, on (torch.compile's default mode) or the mode's name."""
    if not row["compile"]:
        return "off"
    mode = row.get("compile_mode") or "default"
    return "on" if mode == "default" else mode


def fmt(v, spec="{:,.0f}", na="n/a"):
    return na if v is None else spec.format(v)


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    args = meta["args"]
    lines = [f"# MaP-DiT benchmark ({meta['device_name']}, torch {meta['torch']})", "",
             f"{meta['date']}; batch {args['batch_size']}, {args['warmup']} warm-up + {args['steps']}+ timed steps"
             + (f", {args['rounds']} interleaved rounds (medians)" if args['rounds'] > 1 else "")
             + f"; commit {meta.get('commit') or '?'}; {meta['total_s']:.0f} s in all.", ""]
    cuda = meta["device"].startswith("cuda")
    head = ["model", "latent", "switches", "precision", "compile", "train img/s", "step ms", "fwd img/s",
            "train GiB", "fwd GiB", "first step s"]
    if cuda:
        head += ["× ref train", "× ref fwd", "× vanilla train", "× vanilla fwd"]
    cells = []
    for r in rows:
        row = [r["model"], r["latent"], r["switches"], r["precision"], compile_label(r)]
        if "error" in r:
            row += [f"FAILED: {r['error'][:120]}"] + [""] * (len(head) - len(row) - 1)
        else:
            row += [fmt(r["train_img_s"]), fmt(r["train_step_ms"], "{:.1f}"), fmt(r["fwd_img_s"]),
                    fmt(r.get("train_peak_gib"), "{:.2f}"), fmt(r.get("fwd_peak_gib"), "{:.2f}"),
                    fmt(r.get("first_train_step_s"), "{:.1f}")]
            if cuda:
                row += [fmt(r.get(k), "{:.2f}×", "–") for k in ("x_ref_train", "x_ref_fwd", "x_vanilla_train",
                                                                "x_vanilla_fwd")]
        cells.append(row)
    lines += table(head, cells)
    if result["ratios"]:
        lines += ["", "Step-time ratio of each switch set to none (train, fwd; 1.00 = MP is free):", ""]
        head = ["model", "latent", "precision", "compile", "switches", "train ×", "fwd ×"]
        paired = any("train_ratio_paired_median" in e for e in result["ratios"])
        if paired:
            head += ["train × (median of paired rounds)", "fwd × (paired)", "train × (best rounds)",
                     "fwd × (best)"]
        head += ["ref train ×", "ref fwd ×"]
        cells = []
        for e in result["ratios"]:
            row = [e["model"], e["latent"], e["precision"], compile_label(e), e["switches"],
                   f"{e['train_ratio']:.3f}", f"{e['fwd_ratio']:.3f}"]
            if paired:
                row += [fmt(e.get(k), "{:.3f}", "–") for k in ("train_ratio_paired_median",
                        "fwd_ratio_paired_median", "train_ratio_min", "fwd_ratio_min")]
            row += [fmt(e.get("ref_train_ratio"), "{:.2f}", "–"), fmt(e.get("ref_fwd_ratio"), "{:.2f}", "–")]
            cells.append(row)
        lines += table(head, cells)
    if result.get("compile_ratios"):
        lines += ["", "Compiled ÷ eager step time per switch set (below 1.00: compiling pays):", ""]
        paired = any("train_ratio_paired_median" in e for e in result["compile_ratios"])
        head = ["model", "latent", "precision", "compile", "switches", "train ×", "fwd ×"]
        head += ["train × (median of paired rounds)", "fwd × (paired)"] if paired else []
        cells = []
        for e in result["compile_ratios"]:
            row = [e["model"], e["latent"], e["precision"], compile_label(e), e["switches"],
                   f"{e['train_ratio']:.3f}", f"{e['fwd_ratio']:.3f}"]
            if paired:
                row += [fmt(e.get(k), "{:.3f}", "–") for k in ("train_ratio_paired_median", "fwd_ratio_paired_median")]
            cells.append(row)
        lines += table(head, cells)
    recompiled = [r for r in rows if r.get("compiled_while_timed")]
    if recompiled:
        lines += ["", "**These rows compiled inside their timed steps, so their times include compilation** "
                  "(a recompilation on switching between training and sampling, or a guard that keeps failing):", ""]
        lines += [f"- {r['model']} {r['latent']} [{r['switches']}] {r['precision']} compile {compile_label(r)}: "
                  f"{r['compiled_while_timed']} graph(s)" for r in recompiled]
    if cuda:
        lines += ["", f"× ref / ref ×: {reference.NOTE}. × vanilla: facebookresearch/DiT, same source, same "
                  f"precision and compile. Compare with care on another card (this run: {meta['device_name']})."]
    if meta["skipped"]:
        lines += ["", "Skipped (time budget):", ""] + [f"- {s}" for s in meta["skipped"]]
    if meta.get("note"):
        lines += ["", meta["note"]]
    return "\n".join(lines) + "\n"


def commit() -> str | None:
    """The short hash of HEAD, with -dirty when the working tree has uncommitted changes."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here, timeout=10).stdout.strip()
        return (head + ("-dirty" if dirty else "")) or None
    except Exception:  # noqa: BLE001
        return None


def write(result: dict, out: str) -> tuple[str, str]:
    """Writes OUT.json and OUT.md (a given .json or .md suffix is dropped); returns the Markdown and OUT."""
    for suffix in (".json", ".md"):
        out = out[: -len(suffix)] if out.endswith(suffix) else out
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=2, default=str)
    text = markdown(result)
    with open(out + ".md", "w") as f:
        f.write(text)
    return text, out
