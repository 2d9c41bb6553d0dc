"""Plain-text summaries of an ingest report and of a pipeline run: the terminal's and the dashboard's.

`sftflow ingest / pipeline / demo` print them; `sft_pipeline` publishes the same text as its
`pipeline-summary` artifact, so the two never tell different stories.
"""

from __future__ import annotations


def drop_text(report: dict) -> str:
    """One drop: what came in, what became of each row, and the dataset version it left."""
    reasons = ", ".join(f"{k}={v}" for k, v in (report.get("reasons") or {}).items()) or "none"
    head = "already ingested (no-op)" if report.get("noop") else report["status"]
    held_back = report.get("held_back") or 0
    lines = [
        f"drop {report['drop_id']}: {head}",
        f"  rows in {report['rows_in']} = accepted {report['accepted']} + duplicates {report['duplicates']} + "
        f"quarantined {report['quarantined']}" + (f" + held back {held_back}" if held_back else ""),
        f"  reasons: {reasons}",
    ]
    if rows := report.get("dataset_rows"):
        lines.append(f"  dataset {report['dataset_version']} (train {rows['train']}, eval {rows['eval']})")
    return "\n".join(lines)


def pipeline_text(summary: dict) -> str:
    """A pipeline run: its drops, why it skipped (if it did), training, evaluation, GGUF parity, publish."""
    lines = [drop_text(d) for d in summary["drops"]]
    if summary.get("reason"):
        lines.append(f"\n{summary['reason']}")
    if training := summary.get("training"):
        lines.append(f"\ntraining run {training['run_id']} ({training['engine']} engine): loss "
                     f"{training['loss_first']:.3f} -> {training['loss_last']:.3f} in {training['global_step']} steps")
        lines.append(f"  adapter: {training['adapter_dir']}")
    if evaluation := summary.get("evaluation"):
        for model, scores in evaluation["scores"].items():
            lines.append(f"  {model:<9} eval loss {scores['eval_loss']:.3f}  rouge-L {scores['rouge_l']:.3f}  "
                         f"chrF {scores['chrf']:.1f}")
        lines.append(f"  decision: {'promote' if evaluation['decision']['promote'] else 'keep'} "
                     f"({evaluation['decision']['reason']})")
    for kind, p in (summary.get("gguf") or {}).get("parity", {}).items():
        lines.append(f"  gguf {kind:<17} KL {p['kl']:.1e}  top-1 {p['top1']:.3f}  greedy {p['greedy_match']:.3f}")
    if published := summary.get("published"):
        lines.append(f"\npublished {published['name']} {published['version']} "
                     f"({'champion' if published['promoted'] else 'not promoted'}): {published['path']}")
    return "\n".join(lines).lstrip("\n")
