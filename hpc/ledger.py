"""What Slurm did for a sweep: its submissions, every attempt of every task, and why each ended.

The sweep's ``ledger.jsonl`` records each sbatch call this launcher made (stage, job id, the
runs of each array task, resources) and each cancellation. ``attempts`` joins it with sacct
(``-D``: every attempt of a requeued task, with state, exit code, elapsed time, nodes, memory
asked for and allocated TRES) and squeue (why a task still pends), and reads the last line of
the Python exception that submitit pickled for a failed task. What is on disk (trained? which
sets evaluated?) is ``dhm``'s answer (``dhm.core.checkpoint``, ``dhm.evaluation.results``); this
module only
tracks Slurm.
"""

from __future__ import annotations

import getpass
import json
import os
import pickle
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from dhm.core.fsutil import tail
from dhm.core.layout import names_in
from hpc.sweep import sweep_dir

ACTIVE_STATES = {
    "SUBMITTED",  # ours: in the ledger for under 10 minutes, not yet in sacct
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "CONFIGURING",
    "COMPLETING",
    "RESIZING",
    "SUSPENDED",
    "STAGE_OUT",
    "SIGNALING",
}
RESUME_STATES = {"TIMEOUT", "PREEMPTED", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "CANCELLED"}
SACCT_FIELDS = (
    "JobID",
    "State",
    "ExitCode",
    "ElapsedRaw",
    "NodeList",
    "ReqMem",
    "AllocTRES",
    "Reason",
    "Start",
    "End",
)
FRESH_S = 600  # a submission sacct does not know yet counts as in flight this long


class SlurmError(RuntimeError):
    """A Slurm command failed (not a usage error): the message says which and why."""


def ledger_path(cfg_or_dir: Any) -> Path:
    base = cfg_or_dir if isinstance(cfg_or_dir, Path) else sweep_dir(cfg_or_dir)
    return base / "ledger.jsonl"


def _append(path: Path, entry: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **entry}) + "\n"
    with open(path, "a+b") as f:  # (appends go to the end whatever the position)
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                line = "\n" + line  # a line a killed writer cut short stays on its own
        f.write(line.encode())


def job_comment(cfg: Any, token: str) -> str:
    """The ``--comment`` of a job this launcher submits: its launch's token and the absolute
    sweep folder (job names repeat across roots)."""
    return f"dhm:{token}:{sweep_dir(cfg).resolve()}"


def record_intent(cfg: Any, stage: str, tasks: list[dict[str, Any]], dependency: str | None,
                  params: dict[str, Any], code: str) -> str:  # fmt: skip
    """Before an sbatch call: what it will submit, under a new token (returned). A launch
    killed after sbatch answered leaves the intent; ``adopt`` turns it into the submission."""
    token = uuid.uuid4().hex[:12]
    entry = {"token": token, "stage": stage, "tasks": tasks, "dependency": dependency}
    _append(ledger_path(cfg), {"kind": "intent", **entry, "params": params, "code": code})
    return token


def record_submission(
    cfg: Any,
    stage: str,
    job_id: str,
    tasks: list[dict[str, Any]],
    dependency: str | None,
    params: dict[str, Any] | None = None,
    token: str = "",
    code: str = "",
    adopted: bool = False,
) -> None:
    """One sbatch call: ``tasks[i]`` is what array task i does ({runs: [...], set: ...});
    ``code``: the snapshot its tasks import from; ``adopted``: found by its token after the
    launch that submitted it died before recording it."""
    entry = {
        "kind": "submission",
        "stage": stage,
        "job_id": job_id,
        "tasks": tasks,
        "dependency": dependency,
        "params": params or {},
        "token": token,
        "code": code,
    }
    _append(ledger_path(cfg), {**entry, "adopted": True} if adopted else entry)


def record_cancel(cfg: Any, job_ids: list[str], reason: str, tokens: list[str] = ()) -> None:
    """scancel of ``job_ids``; ``tokens``: intents settled with it (nothing left to adopt)."""
    entry = {"kind": "cancel", "job_ids": job_ids, "reason": reason}
    _append(ledger_path(cfg), {**entry, "tokens": list(tokens)} if tokens else entry)


def entries(cfg: Any) -> list[dict[str, Any]]:
    path = ledger_path(cfg)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line) if line.strip() else None
        except ValueError:  # a line a killed writer or a full disk cut short
            continue
        if isinstance(entry, dict):
            entry.setdefault("kind", "submission")
            out.append(entry)
    return out


def submissions(cfg: Any) -> list[dict[str, Any]]:
    """The sweep's sbatch calls, once each (a job adopted twice counts once)."""
    seen: set[tuple[str, str]] = set()
    out = []
    for e in entries(cfg):
        if e["kind"] != "submission":
            continue
        key = (e.get("token", ""), e["job_id"])
        if not key[0] or key not in seen:
            seen.add(key)
            out.append(e)
    return out


def _tokened_jobs(text: str, tokens: set[str], folder: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        job, _, comment = line.strip().partition("|")
        job = job.split("_")[0]  # an array's id, whichever task the line is
        kind, _, rest = comment.partition(":")
        token, _, where = rest.partition(":")
        if kind == "dhm" and token in tokens and where == folder and job.isdigit():
            ids = out.setdefault(token, [])
            if job not in ids:
                ids.append(job)
    return out


def jobs_by_token(cfg: Any, tokens: list[str], since: str | None = None) -> dict[str, list[str]]:
    """{token: job ids} of the jobs that carry this sweep's comment with one of ``tokens``:
    squeue for queued and running jobs (every Slurm), and sacct for ended ones where the
    accounting stores comments (AccountingStoreFlags=job_comment)."""
    if not tokens:
        return {}
    folder = str(sweep_dir(cfg).resolve())
    wanted = set(tokens)
    user = getpass.getuser()
    queue = Started(["squeue", "-a", "-h", "-u", user, "-o", "%F|%k"], "reading the queue")
    cmd = ["sacct", "-X", "-n", "-P", "-o", "JobID,Comment", "-u", user]
    done = Started(cmd + (["-S", since] if since else []), "reading job comments")
    try:
        found = _tokened_jobs(queue.answer(), wanted, folder)
        try:
            ended = _tokened_jobs(done.answer(), wanted, folder)
        except SlurmError:  # accounting down: the queue is what matters
            ended = {}
    finally:
        done.close()
    for token, ids in ended.items():
        have = found.setdefault(token, [])
        have += [i for i in ids if i not in have]
    return found


def age_s(entry: dict[str, Any], now: datetime | None = None) -> float:
    """Seconds since a ledger entry was written."""
    return ((now or datetime.now()) - datetime.fromisoformat(entry["time"])).total_seconds()


def unrecorded_intents(cfg: Any) -> list[dict[str, Any]]:
    """Intents that no submission, cancellation or earlier search settled."""
    done: set[str] = set()
    intents = []
    for e in entries(cfg):
        if e["kind"] in ("submission", "intent_closed"):
            done.add(e.get("token", ""))
        elif e["kind"] == "cancel":
            done.update(e.get("tokens", []))
        elif e["kind"] == "intent":
            intents.append(e)
    return [e for e in intents if e["token"] not in done]


def adopt(cfg: Any) -> list[dict[str, Any]]:
    """Record (and say) the jobs of earlier launches that died between an sbatch call and its
    record (found by the token in their ``--comment``): status and the next launch then see
    them, and never submit their runs again. Returns the intents still unsettled: no job found
    yet, and too young to say that none will appear."""
    intents = unrecorded_intents(cfg)
    if not intents:
        return []
    found = jobs_by_token(cfg, [e["token"] for e in intents], min(e["time"] for e in intents))
    adopted, unsettled = [], []
    now = datetime.now()
    for e in intents:
        for job_id in found.get(e["token"], []):
            record_submission(cfg, e["stage"], job_id, e["tasks"], e["dependency"], e["params"],
                              token=e["token"], code=e.get("code", ""), adopted=True)  # fmt: skip
            adopted.append(job_id)
        if e["token"] in found:
            continue
        if age_s(e, now) > FRESH_S:
            # sbatch never answered (or its job ended where comments are not kept): settled,
            # so later commands stop asking
            _append(ledger_path(cfg), {"kind": "intent_closed", "token": e["token"]})
        else:
            unsettled.append(e)
    if adopted:
        print(f"adopted {len(adopted)} job(s) a launch that died never recorded: "
              f"{' '.join(adopted)}")  # fmt: skip
    return unsettled


def task_runs(task: dict[str, Any]) -> list[str]:
    """The run ids an array task works on (several when runs are packed)."""
    if task.get("noop"):
        return []
    return list(task.get("runs") or ([task["run_id"]] if task.get("run_id") else []))


# ---------------------------------------------------------------------------- sacct, squeue


@dataclass
class SlurmRecord:
    """One attempt of one job or array task, as sacct reports it."""

    job_id: str  # 123 or 123_4
    state: str
    exit_code: str = ""  # "1:0" = exit status 1, signal 0
    elapsed_s: int = 0
    nodes: str = ""
    req_mem: str = ""
    alloc_tres: str = ""
    reason: str = ""
    start: str = ""
    end: str = ""


def parse_sacct(text: str) -> dict[str, list[SlurmRecord]]:
    """``sacct -D -X -P -o SACCT_FIELDS`` output -> {job or job_task: attempts, oldest first}.

    A range record such as ``107_[0-1%2]`` stands for tasks not yet split off (pending ones
    cancelled together); a task's own records win over it.
    """
    own: dict[str, list[SlurmRecord]] = {}
    ranged: dict[str, list[SlurmRecord]] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or "." in parts[0]:
            continue  # job steps such as 123.batch
        parts += [""] * (len(SACCT_FIELDS) - len(parts))
        job, _, task = parts[0].partition("_")
        if not job.isdigit():
            continue
        state = parts[1].split()[0] if parts[1] else "UNKNOWN"
        values = dict(zip(SACCT_FIELDS[2:], parts[2:], strict=False))
        elapsed = int(values["ElapsedRaw"]) if values["ElapsedRaw"].isdigit() else 0
        if task.startswith("["):
            body = task.strip("[]").split("%")[0]
            ids = []
            for piece in body.split(","):
                lo, _, hi = piece.partition("-")
                ids += list(range(int(lo), int(hi or lo) + 1))
            names, target = [f"{job}_{i}" for i in ids], ranged
        else:
            names, target = [parts[0]], own
        for name in names:
            target.setdefault(name, []).append(
                SlurmRecord(
                    name,
                    state,
                    values["ExitCode"],
                    elapsed,
                    values["NodeList"],
                    values["ReqMem"],
                    values["AllocTRES"],
                    values["Reason"],
                    values["Start"],
                    values["End"],
                )
            )
    return {**ranged, **own}


class Started:
    """A Slurm command started now and answered later (``answer()``), so that several run at
    once (each is a round trip to a daemon) while this process reads the disk, without a
    thread competing with it for the interpreter."""

    def __init__(self, cmd: list[str], what: str) -> None:
        self.cmd, self.what = cmd, what
        self.error: OSError | None = None
        try:
            self.proc: subprocess.Popen | None = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        except OSError as err:
            self.proc, self.error = None, err

    def answer(self, timeout: float = 60) -> str:
        """Its stdout; SlurmError saying what failed and why."""
        name = " ".join(self.cmd[:2])
        if self.proc is None:
            raise SlurmError(f"{self.what}: {name} could not run ({self.error})")
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as timed_out:
            self.proc.kill()
            self.proc.communicate()
            raise SlurmError(f"{self.what}: {name} could not run ({timed_out})") from None
        if self.proc.returncode != 0:
            raise SlurmError(f"{self.what}: {name} failed: {err.strip()}")
        return out

    def close(self) -> None:
        """Stop the command if it still runs, and reap it (for a caller that failed before
        reading its answer); nothing once it was answered."""
        if self.proc is not None and self.proc.returncode is None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.communicate()


def run_slurm(cmd: list[str], what: str) -> str:
    """stdout of a Slurm command; SlurmError saying what failed and why."""
    return Started(cmd, what).answer()


class Asked:
    """sacct (every attempt of every task) and squeue (why queued tasks wait) for the jobs a
    sweep's ledger lists, both started when this is made; ``attempts`` reads their answers."""

    def __init__(self, subs: list[dict[str, Any]]) -> None:
        self.subs = subs
        ids = ",".join(sorted({s["job_id"] for s in subs}))
        self.sacct = self.squeue = None
        if ids:
            fields = ",".join(SACCT_FIELDS)
            self.sacct = Started(
                ["sacct", "-D", "-X", "-n", "-P", "-o", fields, "-j", ids],
                "reading job states (is slurmdbd running?)",
            )
            self.squeue = Started(
                ["squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", ids], "reading pending reasons"
            )

    def close(self) -> None:
        for started in (self.sacct, self.squeue):
            if started is not None:
                started.close()

    def records(self) -> dict[str, list[SlurmRecord]]:
        """Every attempt of these jobs and their array tasks, from the accounting database."""
        return parse_sacct(self.sacct.answer()) if self.sacct else {}

    def pending(self) -> dict[str, str]:
        """{job_task: squeue's reason} of queued tasks (Resources, Priority, Dependency, ...);
        {} when squeue cannot answer (the states come from sacct)."""
        try:
            out = self.squeue.answer() if self.squeue else ""
        except SlurmError:
            return {}
        reasons = {}
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) == 3 and parts[1] == "PENDING":
                reasons[parts[0]] = parts[2]
        return reasons


def ask(cfg: Any) -> Asked:
    """Start sacct and squeue for the sweep's submissions (see ``Asked``)."""
    return Asked(submissions(cfg))


# ---------------------------------------------------------------------------- attempts


@dataclass
class Attempt:
    """One attempt of one array task of one stage, for the runs it works on."""

    stage: str  # train | eval | aggregate
    set_name: str  # eval: the set ("" otherwise)
    runs: list[str]
    job_id: str  # 123_4
    submitted: str
    state: str
    exit_code: str = ""
    elapsed_s: int = 0
    nodes: str = ""
    req_mem: str = ""
    alloc_tres: str = ""
    reason: str = ""  # why it ended or waits: exception, pending reason, Slurm state
    log: str = ""  # a log file that exists ("" when the task never started)
    err_log: str = ""
    history: list[SlurmRecord] = field(default_factory=list)  # earlier attempts (requeues)
    params: dict[str, Any] = field(default_factory=dict)
    code: str = ""  # the code snapshot its tasks import from ("" before snapshots)
    oom: bool = False  # OUT_OF_MEMORY, or killed for exceeding --mem (slurmstepd says so)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def exception(self) -> bool:
        """Ended by a Python exception (submitit pickled one), not by Slurm."""
        return self.reason.startswith("exception: ")


def exception_line(trace: str) -> str | None:
    """The exception line of a formatted traceback (``module.Error: message``, its first line
    when the message has several), or None."""
    lines = [ln for ln in str(trace).rstrip().splitlines() if ln.strip()]
    frames = [i for i, ln in enumerate(lines) if ln.startswith("  File ")]
    after = lines[frames[-1] + 1 :] if frames else lines
    for ln in after:
        if not ln.startswith((" ", "\t")) and not set(ln.strip()) <= set("^~ "):
            return ln.strip()
    return lines[-1].strip() if lines else None


def _exception_line(folder: Path, job_id: str) -> str | None:
    """The exception line of the traceback submitit pickled for a failed task (rank 0's)."""
    path = folder / f"{job_id}_0_result.pkl"
    try:
        with open(path, "rb") as f:
            outcome, value = pickle.load(f)
    except (OSError, ValueError, pickle.UnpicklingError, EOFError, TypeError):
        return None
    if outcome != "error":
        return None
    return exception_line(str(value))


def _log(folder: Path, job_id: str, suffix: str, names: set[str]) -> str:
    name = f"{job_id}_0_log.{suffix}"
    return os.path.join(folder, name) if name in names else ""


def attempts(cfg: Any, query: bool = True, asked: Asked | None = None) -> list[Attempt]:
    """Every task this sweep submitted, newest attempt state first resolved, in ledger order.

    ``query``: ask Slurm (sacct, squeue), else only the ledger; ``asked``: the answers of
    queries started earlier (``ask``), for the ledger as it was then."""
    subs = asked.subs if asked is not None else submissions(cfg)
    records: dict[str, list[SlurmRecord]] = {}
    pending: dict[str, str] = {}
    if query and subs:
        asked = asked or Asked(subs)
        try:
            records, pending = asked.records(), asked.pending()
        finally:
            asked.close()
    folder = sweep_dir(cfg) / "slurm"
    logs = set(names_in(folder)) if subs else set()  # one listing, not two stats per task
    now = datetime.now()
    out = []
    for sub in subs:
        array = len(sub["tasks"]) > 1
        age = age_s(sub, now)
        # sacct lags a fresh submission (and slurmdbd may be slow): a job it does not know yet
        # counts as in flight for a while, so a quick relaunch cannot submit it twice.
        unknown = "SUBMITTED" if query and age < FRESH_S else "UNKNOWN"
        stage, _, set_name = sub["stage"].partition(":")
        set_name = set_name.split(":")[0]
        for i, task in enumerate(sub["tasks"]):
            runs = task_runs(task)
            if not runs and stage != "aggregate":
                continue
            name = f"{sub['job_id']}_{i}" if array else sub["job_id"]
            history = records.get(name) or records.get(sub["job_id"]) or []
            rec = history[-1] if history else SlurmRecord(name, unknown)
            a = Attempt(
                stage,
                task.get("set", set_name),
                runs,
                name,
                sub["time"],
                rec.state,
                rec.exit_code,
                rec.elapsed_s,
                rec.nodes,
                rec.req_mem,
                rec.alloc_tres,
                log=_log(folder, name, "out", logs),
                err_log=_log(folder, name, "err", logs),
                history=history[:-1],
                params=sub.get("params", {}),
                code=sub.get("code", ""),
            )
            a.oom = a.state == "OUT_OF_MEMORY" or (
                a.state in ("FAILED", "CANCELLED") and _memory_killed(a.err_log)
            )
            a.reason = _why(a, rec, pending.get(name), folder)
            out.append(a)
    return out


def _memory_killed(err_log: str) -> bool:
    """slurmstepd's words when it kills a step above its --mem (jobacct OverMemoryKill; with
    cgroups Slurm says OUT_OF_MEMORY instead)."""
    return any(
        "exceeded memory limit" in line.lower() or "oom-kill" in line.lower()
        for line in tail(err_log, 30)
    )


def _why(a: Attempt, rec: SlurmRecord, pending: str | None, folder: Path) -> str:
    if a.oom:
        return f"out of memory (asked for {a.req_mem or 'the default'})"
    if a.state == "PENDING":
        # Slurm says "None" until the scheduler has looked at the job
        said = next((r for r in (pending, rec.reason) if r and r != "None"), None)
        return f"pending: {said or 'not yet considered by the scheduler'}"
    if a.state in ("RUNNING", "COMPLETING", "SUBMITTED", "CONFIGURING"):
        return a.state.lower()
    if a.state == "COMPLETED":
        return ""
    if a.state == "FAILED":
        line = _exception_line(folder, a.job_id)
        if line:
            return f"exception: {line}"
        return f"failed with exit code {a.exit_code} (no Python exception recorded)"
    if a.state == "CANCELLED":
        if not a.log and not a.err_log:
            return "cancelled before it started (its dependency failed, or mode=cancel)"
        return "cancelled"
    if a.state == "OUT_OF_MEMORY":
        return f"out of memory (asked for {a.req_mem or 'the default'})"
    return a.state.lower().replace("_", " ")


def latest(atts: list[Attempt]) -> dict[tuple[str, str, str], Attempt]:
    """{(stage, run id, set): its newest attempt} (aggregate attempts under run id '')."""
    out: dict[tuple[str, str, str], Attempt] = {}
    for a in atts:
        for rid in a.runs or [""]:
            out[(a.stage, rid, a.set_name)] = a  # ledger order: later submissions win
    return out


def log_tail(a: Attempt, lines: int = 15) -> list[str]:
    """The last lines of the attempt's error log, else of its output log."""
    return tail(a.err_log, lines) or tail(a.log, lines)


def scancel(job_ids: list[str]) -> None:
    if job_ids:
        try:
            subprocess.run(["scancel", *job_ids], check=True, timeout=60, capture_output=True)
        except (OSError, subprocess.SubprocessError) as err:
            raise SlurmError(f"scancel {' '.join(job_ids)} failed: {err}") from None
