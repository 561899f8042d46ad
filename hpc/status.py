"""Where every run of a sweep stands, from its stored plan, the disk and Slurm.

One row per run: its stage; the stage's own newest task with its Slurm state and exit code;
why it ended or waits (the last line of the Python exception, Slurm's pending reason, or the
state); epoch/step and last loss (read from the end of metrics.csv, not the whole file); the
GPU-hours (CPU-hours on CPU partitions) its tasks used; and a log file that exists.
``mode=status runs=<id>`` shows one run in full: every attempt of every stage and the tail of
its log. What each row says is ``hpc.state.describe``'s: the summary's ``problem`` column
and the report show the same.
"""

from __future__ import annotations

import re
from typing import Any

from dhm.core import variants as V
from dhm.core.layout import plan_estimates, summary_complete
from hpc import ledger
from hpc.file_facts import FileFacts
from hpc.state import (
    BUCKETS,
    describe,
    own_attempts,
    plain_states,
    read_states,
    run_states,
    variant_states,
)
from hpc.sweep import Run, sweep_dir

_DOTTED_ERROR = re.compile(
    r"^(exception: )(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)\b)"
)


def _short_reason(reason: str, width: int = 100) -> str:
    """The table's cell for a reason: an exception's class without its module path (the full
    line is in the one-run view), cut to ``width`` characters."""
    reason = _DOTTED_ERROR.sub(r"\1\2", reason)
    return reason if len(reason) <= width else reason[: width - 3] + "..."


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def _code(st: Any) -> str:
    """The code snapshots a run's newest tasks imported: training's, then any other of its
    evaluations' ("-" before snapshots)."""
    train = [a.code for (stage, _), atts in st.attempts.items() if stage == "train" for a in atts]
    evals = {atts[-1].code for (stage, _), atts in st.attempts.items() if stage == "eval"}
    own = train[-1][:8] if train and train[-1] else ""
    other = sorted(c[:8] for c in evals if c and c[:8] != own)
    text = own + (f" (eval {'+'.join(other)})" if other else "")
    return text.strip() or "-"


def status_lines(
    cfg: Any,
    runs: list[Run],
    query: bool,
    estimates: dict[str, float] | None = None,
    outside: list[Run] = (),
) -> tuple[list[str], dict[str, dict]]:
    """The status table (one row per run), its footer, and the states for the report;
    ``estimates``: the stored plan's device-hours per run (read from plan.json if None);
    ``outside``: runs an earlier plan had and a replan dropped, listed after the footer with
    their state (never cancelled or deleted by a launch)."""
    facts = FileFacts(sweep_dir(cfg), open_shards=False)  # no h5py: ids a launch read
    states, everything = read_states(cfg, [*runs, *outside], query, facts)
    states, gone = states[: len(runs)], states[len(runs) :]
    infos = {st.run.run_id: describe(st) for st in states}
    variants = V.read_registry(sweep_dir(cfg))
    if len(variants) < 2:
        variants = []  # one evaluation: the stage column says it all
    evals = {st.run.run_id: variant_states(st, variants, facts) for st in states}
    rows, counts = [], {}
    if estimates is None:
        estimates = plan_estimates(sweep_dir(cfg))
    for st in states:
        i = infos[st.run.run_id]
        counts[i["bucket"]] = counts.get(i["bucket"], 0) + 1
        why = _short_reason(i["reason"])
        est = estimates.get(st.run.run_id)
        rows.append(
            (
                st.run.run_id,
                i["stage"],
                i["slurm"],
                i["step"],
                i["loss"],
                f"{i['hours']:.2f}",
                "-" if est is None else f"{est:.2f}",
                _code(st),
                *(
                    [" ".join(f"{k}:{v}" for k, v in evals[st.run.run_id].items())]
                    if variants
                    else []
                ),
                why or "-",
                i["log"],
            )
        )
    unit = "GPU" if cfg.cluster.gpus_per_node else "CPU"
    lines = _table(
        (
            "run_id",
            "stage",
            "slurm",
            "epoch/step",
            "loss",
            f"{unit}-h",
            f"{unit}-h est",
            "code",
            *(["variants"] if variants else []),
            "why",
            "log",
        ),
        rows,
    )
    done, why = summary_complete(sweep_dir(cfg), [r.run_id for r in runs])
    agg = ledger.latest(everything).get(("aggregate", "", ""))
    if agg is not None:
        why += f"; aggregate job {agg.job_id} {agg.state}" + (
            f": {agg.reason}" if agg.reason else ""
        )
        if agg.state == "FAILED" and agg.err_log:
            why += f" (log {agg.err_log})"
    parts = ", ".join(f"{counts[k]} {k}" for k in BUCKETS if k in counts)
    total = sum(i["hours"] for i in infos.values())
    lines.append(f"{len(states)} runs: {parts}; {why}; {total:.2f} {unit}-hours used")
    for v in variants:
        said = [e[v.name] for e in evals.values()]
        counts_v = ", ".join(
            f"{said.count(k)} {k}" for k in ("done", "running", "missing") if k in said
        )
        partial = sum(s not in ("done", "running", "missing") for s in said)
        counts_v += f", {partial} partial" if partial else ""
        lines.append(
            f"variant {v.name} ({v.id}; {v.describe(variants[0])}): {counts_v.lstrip(', ')}"
        )
    facts.save()
    if gone:
        lines += ["", f"{len(gone)} run(s) outside the current grid (a replan dropped them; "
                  "kept as they are; cancel with mode=cancel runs=[...]):"]  # fmt: skip
        for st in gone:
            i = describe(st)
            settings = " ".join(f"{k}={v}" for k, v in st.run.overrides.items())
            reason = _short_reason(i["reason"]) or "-"
            lines.append(f"  {st.run.run_id}  {i['stage']}  {i['slurm']}  {reason}  {settings}")
    return lines, plain_states(infos)


def detail_lines(cfg: Any, run: Run, query: bool) -> list[str]:
    """Everything about one run: settings, every attempt of every stage, the log's tail."""
    (st,) = run_states(cfg, [run], query_slurm=query)
    info = describe(st)
    settings = " ".join(f"{k}={v}" for k, v in run.overrides.items()) or "(base config)"
    lines = [
        f"run {run.run_id}: {settings}",
        f"  folder {run.run_dir}",
        f"  stage {info['stage']}: {info['reason'] or 'ok'}",
        f"  trained: {st.trained}; resume step: {st.resume_step}; sets: "
        + ", ".join(f"{s} {'done' if d else 'missing'}" for s, d in st.eval_done.items()),
    ]
    rows = []
    for (stage, set_name), atts in sorted(st.attempts.items()):
        for a in atts:
            for k, rec in enumerate([*a.history, a]):
                last = k == len(a.history)
                rows.append(
                    (
                        f"{stage}{':' + set_name if set_name else ''}",
                        a.job_id,
                        a.submitted if k == 0 else "(requeued)",
                        rec.state,
                        rec.exit_code or "-",
                        f"{rec.elapsed_s}s",
                        rec.nodes or "-",
                        a.code[:8] or "-",
                        (a.reason if last else rec.reason) or "-",
                        (a.err_log or a.log) if last else "-",
                    )
                )
    if rows:
        lines += [
            "",
            *_table(
                (
                    "stage",
                    "job",
                    "submitted",
                    "state",
                    "exit",
                    "elapsed",
                    "nodes",
                    "code",
                    "why",
                    "log",
                ),  # fmt: skip
                rows,
            ),
        ]
    own = own_attempts(run.run_dir)
    if own:
        lines += ["", "train attempts recorded by the run (logs/train_attempts.jsonl):"]
        lines += [
            f"  {o.get('time')} job {o.get('job')} restart {o.get('restart')} on "
            f"{o.get('host')}: {o.get('outcome')}"
            + (f" at step {o['step']}" if o.get("step") is not None else "")
            + (f": {o['exception']}" if o.get("exception") else "")
            for o in own
        ]
    a = info["attempt"]
    if a is not None:
        log_lines = ledger.log_tail(a, 15)
        if log_lines:
            lines += ["", f"tail of {a.err_log or a.log}:", *("  " + ln for ln in log_lines)]
    return lines
