"""The encoder tasks' held-out metrics, computed with the field's standard tools: seqeval for entity-level
precision / recall / F1 (an entity counts only when its type and exact span match), scikit-learn for accuracy,
macro-F1 and the per-class report; and their markdown table for report.md and `fastnlg eval`."""
from __future__ import annotations


def entity_metrics(gold: list, pred: list) -> dict:
    """gold, pred: per sentence, the tags of its words (BIO). Micro P/R/F1 (all entities), macro F1 (mean over
    types), per type {precision, recall, f1, support}, and token accuracy over the words."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    words = sum(len(g) for g in gold)
    correct = sum(a == b for g, p in zip(gold, pred) for a, b in zip(g, p))
    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    per_type = {k: {m: float(v[m]) if m != "support" else int(v[m]) for m in ("precision", "recall", "f1-score", "support")}
                for k, v in report.items() if k not in ("micro avg", "macro avg", "weighted avg")}
    return {"eval_precision": float(precision_score(gold, pred, zero_division=0)),
            "eval_recall": float(recall_score(gold, pred, zero_division=0)),
            "eval_f1": float(f1_score(gold, pred, zero_division=0)),
            "eval_macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0)),
            "eval_token_accuracy": correct / words if words else 0.0, "eval_per_type": per_type}


def class_metrics(gold: list, pred: list, labels: list) -> dict:
    from sklearn.metrics import accuracy_score, classification_report, f1_score

    report = classification_report(gold, pred, labels=labels, output_dict=True, zero_division=0)
    per_class = {k: {m: float(report[k][m]) if m != "support" else int(report[k][m])
                     for m in ("precision", "recall", "f1-score", "support")} for k in labels}
    return {"eval_accuracy": float(accuracy_score(gold, pred)),
            "eval_macro_f1": float(f1_score(gold, pred, labels=labels, average="macro", zero_division=0)),
            "eval_per_class": per_class}


def report_table(title: str, rows: dict, m: dict) -> str:
    lines = [f"## {title}", "", "| | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1-score']:.3f} | {r['support']} |")
    summary = {k: v for k, v in m.items() if isinstance(v, float)}
    lines += ["", " · ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in summary.items())]
    return "\n".join(lines) + "\n"
