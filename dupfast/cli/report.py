"""`report.md` for every command, as `dupfast demo` writes one: Markdown beside the command's JSON, with PNGs.

A command builds its report from the numbers it saves in its JSON (the report computes none of them) out of these
sections, each a list of Markdown lines:

    detection_page(title, summary, ...)  a detection's report: the three sections below, in this order
    detection_lines(summary, ...)   the verdict, counts, threshold and score histogram
    truth_lines(summary, ...)       AUROC / FAR / FRR against a poison_label column, and the ROC
    candidate_lines(candidates)     trigger candidates (trigger_candidates: dupfast.triggers' words in many flagged
                                    rows and few kept, with their flip rates)
    write_purify(out, report, ...)  a purification's report: headline (the outcome in one sentence), then
                                    purify_lines (what gated it, before -> after on held-out rows, the stop in
                                    words, the trajectory) and the trajectory PNG
    btu_lines(report, ...)          suspects with their evidence, the exposure rounds, the steps, before -> after
    write(out, lines, files)        report.md: the sections, then a listing of the output files that exist

PNGs use matplotlib's Agg backend, imported only when one is drawn (dupfast.harness.detection_report.pyplot).
"""
import collections
import math
import pathlib
import re

from ..harness.demo_report import fmt, markdown_table, plot_trajectory, trajectory_table
from ..harness.detection_report import pyplot, save_figure

PNG_TRAJECTORY = "purify_trajectory.png"


def code(text) -> str:
    """`text` as inline code that survives a Markdown table (no backtick or pipe breaks out of it)."""
    return "`" + str(text).replace("`", "'").replace("|", "\\|").replace("\n", " ") + "`"


def facts_table(rows) -> list:
    """A two-column table of (what, value) rows."""
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def write(out, lines, files=()) -> pathlib.Path:
    """report.md in `out`: `lines`, then `files` ((name, what it holds) pairs) that exist, linked."""
    out = pathlib.Path(out)
    listed = [(name, what) for name, what in files if (out / name).exists()]
    if listed:
        lines = [*lines, "", "## Files", ""]
        for name, what in listed:
            shown = name + "/" if (out / name).is_dir() else name
            lines.append(f"- [{code(shown)}]({shown}): {what}")
    path = out / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path


# ---- detection ------------------------------------------------------------------------------------------------

def trigger_candidates(texts, flags, top: int = 10, **evidence) -> list:
    """dupfast.triggers' candidates as JSON-ready dicts (word, flagged, flagged_share, kept, kept_share, ratio,
    score, common, clean, clean_share, top_token, flip_rate, flip_rows): words in a larger share of the flagged
    rows than of the kept ones. evidence: triggers' keywords (model, tokenizer, clean_texts, detection, max_len,
    batch_size) for the flip rate, the clean set's share and the most-attended-token count."""
    from ..detection.triggers import triggers

    return [c.to_dict() for c in triggers(texts, flags, top=top, **evidence)]


def top_token_counts(top_words, flags, top: int = 10) -> list:
    """The tokens the reading token attends most in the flagged rows, most frequent first: on a backdoored model
    the trigger heads this list (DetectionResult.top_tokens)."""
    counts = collections.Counter(w for w, f in zip(top_words, flags) if f and w)
    n_f = max(1, sum(bool(f) for f in flags))
    return [{"token": w, "flagged_rows": c, "share": c / n_f} for w, c in counts.most_common(top)]


def detection_lines(summary: dict, frr: float, mode: str, hist: str, flagged_in: str = "", kept_in: str = "",
                    facts=()) -> list:
    """The verdict sentence (summary["verdict_sentence"]), the counts and threshold, then `facts` ((what, value)
    rows), and the histogram. summary: `detection_report.summarize`'s, and the command's additions."""
    v = summary.get("verdict") or {}
    n, k = summary["samples"], summary["flagged"]
    source = {"pool": "placed on the pool's clean bulk", "clean": "the clean set's"}.get(v.get("threshold_source"))
    rows = [("rows", f"{n:,}"), ("flagged", f"{k:,} ({k / n:.1%}){flagged_in}"),
            ("kept", f"{summary['kept']:,}{kept_in}")]
    if "duplicates" in summary:
        rows.append(("duplicate rows", f"{summary['duplicates']:,} (counted once by the verdict)"))
    rows.append(("threshold", f"{summary['threshold']:.4g} (target FRR {frr:.0%}, mode {mode}"
                              + (f", {source}" if source else "") + ")"))
    if v.get("p_value") is not None:
        rows.append(("presence test", f"p = {v['p_value']:.3g}"))
    return [f"**{summary['verdict_sentence']}**", "", *facts_table([*rows, *facts]), "",
            f"![score histogram]({hist})"]


def detection_page(title: str, summary: dict, frr: float, name: str, facts=(), flagged_in: str = "",
                   kept_in: str = "") -> list:
    """A detection's report: the title, detection_lines, truth_lines and candidate_lines, with the PNGs of
    dupfast.harness.detection_report.write_plots (`name`_hist.png, `name`_roc.png)."""
    return [f"# {title}", "",
            *detection_lines(summary, frr, summary["mode"], f"{name}_hist.png", flagged_in, kept_in, facts),
            *truth_lines(summary, "the poison_label column", f"{name}_roc.png"),
            *candidate_lines(summary.get("trigger_candidates") or ())]


def truth_lines(summary: dict, column: str, roc: str) -> list:
    """Against ground truth (a poison_label column): AUROC, FAR and FRR at the threshold, the ROC; or the notes
    saying why a metric is absent."""
    lines = []
    if "auroc" in summary:
        frr = summary.get("frr_observed", summary.get("frr"))
        lines += ["", f"## Against {column}", "",
                  f"AUROC {summary['auroc']:.3f}; at the threshold FAR {fmt(summary.get('far'), 3)} (poisoned rows "
                  f"kept), FRR {fmt(frr, 3)} (clean rows flagged).", "", f"![ROC]({roc})"]
    for note in summary.get("notes", ()):
        lines += ["", f"Note: {note}"]
    return lines


def candidate_lines(candidates) -> list:
    """The trigger candidates (trigger_candidates' dicts) as a table, with a sentence when there is none and when
    the best of them are common words (no evidence of a trigger)."""
    from ..detection.triggers import COMMON_SHARE

    lines = ["", "## Trigger candidates", ""]
    if not candidates:
        return lines + ["No trigger candidate found: no word is in at least twice the share of flagged rows as of "
                        "kept rows."]
    common = f"common words (each in more than {COMMON_SHARE:.0%} of the kept or clean rows)"
    if all(c.get("common") for c in candidates):
        lines += [f"Only {common} are over-represented in the flagged rows: no trigger word stands out.", ""]
    lines.append("Words over-represented in the flagged rows (rows holding the word; a backdoor's trigger words top "
                 "this list):")
    cols = _candidate_columns(candidates)
    table = markdown_table([[cell(c) for _, cell in cols] for c in candidates], [h for h, _ in cols])
    lines += ["", *table.splitlines()]
    if any(c.get("flip_rate") is not None for c in candidates):
        lines += ["", "Flip rate: of the flagged rows holding the word that were measured (their count shown), the "
                      "share whose predicted class changes when the word is deleted from them."]
    if any(c.get("top_token") is not None for c in candidates):
        lines += ["", "Top token: the flagged rows whose most-attended token lies in the word."]
    if any(c.get("common") for c in candidates) and not all(c.get("common") for c in candidates):
        lines += ["", f"The {common} are marked and listed last: they are not evidence of a trigger."]
    return lines


def _candidate_columns(candidates) -> list:
    """(header, cell of a candidate) of the columns some candidate has a value for."""
    has = lambda key: any(c.get(key) is not None for c in candidates)  # noqa: E731
    cols = [("word", lambda c: code(c["word"])),
            ("flagged rows", lambda c: f"{c['flagged']:,} ({c['flagged_share']:.1%})"),
            ("kept rows", lambda c: f"{c['kept']:,} ({c['kept_share']:.1%})")]
    if has("clean_share"):
        cols.append(("clean rows", lambda c: "-" if c.get("clean") is None else
                     f"{c['clean']:,} ({c['clean_share']:.1%})"))
    cols.append(("ratio", lambda c: f"{c['ratio']:.1f}"))
    if has("top_token"):
        cols.append(("top token", lambda c: "-" if c.get("top_token") is None else f"{c['top_token']:,}"))
    if has("flip_rate"):
        cols.append(("flip rate", lambda c: "-" if c.get("flip_rate") is None else
                     f"{c['flip_rate']:.1%} of {c['flip_rows']:,}"))
    if any(c.get("common") for c in candidates):
        cols.append(("common", lambda c: "common" if c.get("common") else ""))
    return cols


# ---- purification ---------------------------------------------------------------------------------------------

# (what, the teacher's key, the history's key, decimals): the held-out numbers before -> after
CLASSIFIER_METRICS = (("held-out flagged rows: agreement with the model as given (the ASR proxy)",
                       "heldout_flag_agreement", "agree", 3),
                      ("held-out clean rows: accuracy", "heldout_clean_acc", "acc", 3))
GENERATIVE_METRICS = (("held-out flagged prompts: the model as given's response still generated",
                       "heldout_flag_agreement", "agree", 3),
                      ("held-out clean prompts: reference response generated (exact match)",
                       "heldout_clean_match", "clean_match", 3),
                      ("held-out clean prompts: response cross-entropy", "heldout_clean_loss", "clean_loss", 4))
# the trajectory table's columns: the stopping rule's numbers, then the training losses between evaluations
CLASSIFIER_COLUMNS = (("epoch", "epoch", 2), ("flagged agreement", "agree", 3), ("clean acc", "acc", 3),
                      ("loss", "loss", 4), ("ascent", "ascent", 4), ("clean CE", "ce", 4))
GENERATIVE_COLUMNS = (("flagged agreement", "agree", 3), ("clean match", "clean_match", 3),
                      ("clean CE (held out)", "clean_loss", 4), ("loss", "loss", 4), ("ascent", "ascent", 4),
                      ("train CE", "ce", 4))
SKIPPED = ("no evidence of poison", "no flagged inputs")


def step_count(n: int) -> str:
    return f"{n} step" + ("" if n == 1 else "s")


def skipped(report: dict) -> bool:
    return report.get("stop_reason") in SKIPPED


def headline(report: dict) -> str:
    """The outcome of a purification in one sentence."""
    sel = report.get("selected") or {}
    if skipped(report):
        return "Skipped: nothing was unlearned; `model/` is the model as given."
    if sel.get("step", 0) > 0:
        return (f"Purified: {step_count(report.get('steps_run', 0))} run, the state of step {sel['step']} kept and "
                "merged into `model/`.")
    return "Unchanged: no state beat the model as given, so `model/` is the model as given."


def stop_in_words(report: dict, acc_name: str = "clean accuracy") -> str:
    """Why purification stopped, and which state it kept, in plain words (the raw reason is shown beside it)."""
    reason, cfg = report.get("stop_reason") or "", report.get("config") or {}
    sel, n = report.get("selected") or {}, report.get("steps_run", 0)
    if reason == "no evidence of poison":
        return ("Skipped: the detection found no evidence of poison in the suspect set, so nothing was unlearned "
                "and `model/` is the model as given. Pass --force to unlearn the flagged rows anyway.")
    if reason == "no flagged inputs":
        return ("Skipped: no row of the suspect set was flagged, so there was nothing to unlearn; `model/` is the "
                "model as given.")
    m = re.match(r"held-out flagged agreement ([\d.]+) <= ([\d.eE+-]+)", reason)
    if m:
        said = (f"Stopped early after step {n}: on the held-out flagged rows the model now keeps the label (or "
                f"response) of the model as given on only {float(m.group(1)):.1%} of them, at or below the bound "
                f"of {float(m.group(2)):.0%}, while the held-out {acc_name} fell no more than "
                f"{cfg.get('acc_tolerance', 'the tolerance')} below the model as given's: what the flagged rows "
                "triggered is unlearned on rows held out of training.")
    elif reason.startswith("no lower admissible agreement"):
        said = (f"Stopped after step {n}: several evaluations in a row ({reason.rsplit(' in ', 1)[-1]}) found no "
                f"state with a lower held-out flagged agreement that kept the held-out {acc_name} within tolerance, "
                "so more steps were not helping.")
    elif reason.startswith("step budget exhausted"):
        said = (f"Ran the whole step budget ({step_count(n)}) without the held-out flagged agreement reaching the "
                f"bound of {cfg.get('agree_bound', '?')} with the {acc_name} within tolerance.")
    else:
        said = reason
    if cfg.get("select_best") is False:
        kept = f" The last state (step {sel.get('step', n)}; select_best off) was kept and merged into `model/`."
    elif sel.get("step", 0) > 0:
        kept = (f" The state of step {sel['step']} (the lowest held-out flagged agreement among the states that "
                f"kept the {acc_name}) was kept and merged into `model/`.")
    else:
        kept = (" No evaluated state beat the model as given (a lower held-out flagged agreement with the "
                f"{acc_name} kept), so the model as given was kept: `model/` is unchanged.")
    return said + kept


def purify_lines(report: dict, gate: list, metrics=CLASSIFIER_METRICS, columns=CLASSIFIER_COLUMNS,
                 trajectory=None, acc_name: str = "clean accuracy", kept: str = "prediction") -> list:
    """What gated the run (`gate`: paragraphs on the detection or the flags), before -> after on the held-out rows,
    the stop reason in words, the trajectory (`trajectory`: its PNG's name) and the warnings.
    report: a PurifyReport's to_dict()."""
    data, teacher, sel = report.get("data") or {}, report.get("teacher") or {}, report.get("selected") or {}
    lines = ["## What gated it"]
    for paragraph in gate:
        lines += ["", paragraph]
    lines += ["", "## Before → after, on held-out rows", ""]
    if skipped(report):
        lines.append("Not measured: nothing was unlearned.")
    else:
        # the held-out counts: purify's keys, purify_generative's
        n_f, n_c = (data.get(k, data.get(g, "?")) for k, g in (("flagged_holdout", "flag_hold"),
                                                                ("clean_holdout", "clean_hold")))
        held = f"{n_f} flagged and {n_c} clean rows held out of training (split by token hash)"
        if data.get("eval_rows") == "train":
            held = "no row could be held out, so these are the training rows' numbers"
        lines += [f"Measured on what a defender holds, {held}; the after column is the kept state (step "
                  f"{sel.get('step', 0)}).", "",
                  markdown_table([[what, fmt(teacher.get(t_key), d), fmt(sel.get(s_key), d)]
                                  for what, t_key, s_key, d in metrics],
                                 ("", "before (the model as given)", "after (purified)"))]
    lines += trigger_invariance_lines(report, kept)
    lines += ["", "## Stop", "", stop_in_words(report, acc_name), "",
              f"(stop reason: {code(report.get('stop_reason'))}; {step_count(report.get('steps_run', 0))} run)"]
    history = report.get("history") or []
    if len(history) > 1:
        lines += ["", "## Trajectory", "",
                  "Each evaluation's held-out numbers (the stopping rule's) and the training losses since the "
                  "previous one; step 0 is the model as given.", ""]
        if trajectory:
            lines += [f"![purification trajectory]({trajectory})", ""]
        lines.append(trajectory_table(history, sel, columns))
    for w in () if skipped(report) else report.get("warnings") or ():  # a skip's warning is its stop reason
        lines += ["", f"Warning: {w}"]
    return lines


def trigger_invariance_lines(report: dict, kept: str = "prediction") -> list:
    """Which trigger candidates were inserted into the clean rows (purify(triggers=...)), or why none was. kept: what
    a copy keeps ("response" for purify_generative). A run that searched and found nothing (data holds an empty
    trigger_candidates) says so too."""
    data = report.get("data") or {}
    inserted = data.get("trigger_candidates")
    searched = inserted is not None or bool(report.get("triggers"))
    if skipped(report) or not searched:
        return []
    lines = ["", "## Trigger invariance", ""]
    if inserted:
        cap = (report.get("config") or {}).get("kl_cap")
        lines.append(f"{data.get('invariance_rows', 0):,} clean training rows were copied with one of "
                     f"{', '.join(code(w) for w in inserted)} inserted and trained to keep the clean row's "
                     f"{kept}, so the trigger is forgotten rather than inverted (ascent cap {cap} nats).")
    else:
        lines.append("No trigger candidate was inserted: none stood out (or only common words), so the bounded "
                     "ascent worked alone.")
    return lines


def detection_gate(suspect, how: str, detection, force: bool) -> list:
    """The paragraphs on the detection that gated a purification: its verdict, and what a "no poison" one did."""
    gate = [f"The detection on {code(suspect)} ({how}): **{detection.summary}**."]
    if detection.poison_present is False:
        gate.append("--force: the flagged rows were unlearned although the detection found no evidence of poison."
                    if force else "With no evidence of poison nothing is unlearned unless --force.")
    return gate


def write_purify(out, report: dict, model, gate: list, files, generative: bool = False) -> pathlib.Path:
    """A purification's report.md (and its trajectory PNG when it trained). report: a PurifyReport's to_dict();
    generative: a causal LM's (`dupfast.purify_generative`: clean exact match and CE instead of accuracy)."""
    trained = len(report.get("history") or ()) > 1
    if trained:
        plot_purify(pathlib.Path(out) / PNG_TRAJECTORY, report, *(("clean_match", "held-out clean exact match")
                                                                   if generative else ()))
    options = (dict(metrics=GENERATIVE_METRICS, columns=GENERATIVE_COLUMNS, acc_name="clean exact match",
                    kept="response") if generative else {})
    lines = [f"# dupfast {'purify-generative' if generative else 'purify'}: {code(model)}", "",
             f"**{headline(report)}**", "",
             *purify_lines(report, gate, trajectory=PNG_TRAJECTORY if trained else None, **options)]
    return write(out, lines, files)


def plot_purify(path, report: dict, acc_key: str = "acc", acc_label: str = "held-out clean accuracy"):
    """The trajectory PNG: held-out flagged agreement and the clean number per evaluation, the bounds, the kept
    step (dupfast.harness.demo_report.plot_trajectory, without the demo's test-set markers)."""
    cfg, teacher = report.get("config") or {}, report.get("teacher") or {}
    acc0, tol = teacher.get("heldout_clean_acc", teacher.get("heldout_clean_match")), cfg.get("acc_tolerance")
    floor = acc0 - tol if acc0 is not None and tol is not None and not math.isnan(acc0) else None
    plot_trajectory(path, report["history"], selected=report.get("selected"), agree_bound=cfg.get("agree_bound"),
                    acc_floor=floor, acc_key=acc_key, acc_label=acc_label,
                    agree_label="held-out flagged: agreement with the model as given")


# ---- BTU ------------------------------------------------------------------------------------------------------

def token_evidence(tok, texts, labels, ids) -> list:
    """Per suspect token id: the training rows holding it and the most common label among them (a dirty-label
    trigger sits in rows of the target label)."""
    wanted = set(ids)
    rows = {t: collections.Counter() for t in ids}
    for seq, y in zip(tok(list(texts), add_special_tokens=False)["input_ids"], labels):
        for t in set(seq) & wanted:
            rows[t][y] += 1
    out = []
    for t in ids:
        c = rows[t]
        label, top = c.most_common(1)[0] if c else (None, 0)
        out.append({"id": t, "rows": sum(c.values()), "majority_label": label,
                    "majority_share": top / sum(c.values()) if c else None})
    return out


def btu_lines(report: dict, evidence: list, suspects_png: str, steps_png=None) -> list:
    """Suspects with their evidence, the exposure rounds, the steps and before -> after. report: the btu_report.json
    dict (`exposure`, and `steps` / `suspects` when it trained)."""
    exposure = report.get("exposure") or {}
    ranked = exposure.get("suspects") or [{"token_id": s["id"], "token": s["token"]} for s in report["suspects"]]
    rounds = [r["name"] for r in exposure.get("rounds", ())]
    steps = report.get("steps") or []
    dims = {d["id"]: d["dims"] for s in steps if s["step"] == "unlearn" for d in s.get("dims_replaced", ())}
    ev = {e["id"]: e for e in evidence}
    lines = ["", "## Suspects", "",
             "The tokens whose embeddings training moved most (score: the largest movement over the rounds, 1 = the "
             "round's top); the evidence: the training rows holding each, and the most common label among them (a "
             "dirty-label trigger sits in rows of the target label).", ""]
    cols = ("#", "token", "id", "score", *(f"rank {r}" for r in rounds), "training rows", "their majority label",
            *(("dims reset",) if dims else ()))
    table = []
    for i, s in enumerate(ranked, 1):
        e, t = ev.get(s["token_id"], {}), s["token_id"]
        share = "-" if e.get("majority_share") is None else f"{e['majority_label']} ({e['majority_share']:.0%})"
        table.append([str(i), code(s["token"]), str(t), fmt(s.get("score"), 3),
                      *(str((s.get("ranks") or {}).get(r) or "-") for r in rounds), str(e.get("rows", "-")), share,
                      *((str(dims.get(t, 0)),) if dims else ())])
    lines += [markdown_table(table, cols, left=2) if table else "No token moved: no suspect.", "",
              f"![suspects]({suspects_png})"]
    if exposure.get("rounds"):
        lines += ["", "## Exposure rounds", "",
                  markdown_table([[r["name"], r.get("description", ""),
                                   " ".join(code(x["token"]) for x in r.get("top", ())[:8]),
                                   f"{r.get('train_size', '-')}", str(r.get("steps", "-")),
                                   fmt(r.get("final_loss"), 4), fmt(r.get("seconds"), 1)] for r in exposure["rounds"]],
                                 ("round", "what", "top tokens", "rows", "steps", "final loss", "seconds"), left=3)]
    if steps:
        evals = [s for s in steps if s.get("eval")]
        keys = sorted({k for s in evals for k in s["eval"]})
        lines += ["", "## Steps", "",
                  markdown_table([[s["step"], fmt(s.get("seconds"), 1), fmt(s.get("final_loss"), 4),
                                   *(fmt((s.get("eval") or {}).get(k)) for k in keys)] for s in steps],
                                 ("step", "seconds", "final loss", *(k.upper() for k in keys)))]
        if evals:
            first, last = evals[0], evals[-1]
            lines += ["", "## Before → after", "",
                      f"`{first['step']}` is the model fine-tuned without BTU's unlearning; `{last['step']}` the "
                      "defended model (`model/`).", "",
                      markdown_table([[k.upper(), fmt(first["eval"].get(k)), fmt(last["eval"].get(k))] for k in keys],
                                     ("", f"before ({first['step']})", f"after ({last['step']})"))]
            if steps_png:
                lines += ["", f"![metrics per step]({steps_png})"]
        else:
            lines += ["", "No metric measured: pass --eval (CACC) and --eval-poison with --target (ASR) for the "
                          "before → after numbers."]
    return lines


def plot_suspects(path, suspects: list, top: int = 30):
    """Horizontal bars: each suspect's score (its largest movement over the rounds), most suspicious on top."""
    plt = pyplot()
    shown = suspects[:top][::-1]
    fig, ax = plt.subplots(figsize=(6.5, max(2.0, 0.28 * len(shown) + 1.2)))
    ax.barh(range(len(shown)), [s.get("score", 1.0) for s in shown], color="#D55E00")
    ax.set_yticks(range(len(shown)), [s["token"] for s in shown], fontsize=8)
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("movement score (1 = a round's top token)")
    ax.set_title(f"BTU suspects ({len(suspects)})" + (f", top {top}" if len(suspects) > top else ""))
    save_figure(fig, path)


def plot_steps(path, steps: list):
    """The metrics measured after every BTU step (CACC, ASR), one line each."""
    plt = pyplot()
    evals = [s for s in steps if s.get("eval")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, color in zip(sorted({k for s in evals for k in s["eval"]}), ("#D55E00", "#0072B2", "#009E73")):
        ax.plot(range(len(evals)), [s["eval"].get(key, float("nan")) for s in evals], "-o", color=color,
                label=key.upper())
    ax.set_xticks(range(len(evals)), [s["step"] for s in evals])
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("fraction")
    ax.set_title("BTU: metrics after each step")
    ax.legend()
    save_figure(fig, path)
