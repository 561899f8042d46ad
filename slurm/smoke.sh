#!/usr/bin/env bash
# Job scripts below are single-quoted on purpose: they expand in the job.
# shellcheck disable=SC2016
# Smoke test for the local cluster started by slurm/cluster.sh up:
# a plain job, a 2-node srun job, an array with aftercorr dependency, a
# requeue after USR2, and (if PYTHON has submitit) a submitit job.
#   PYTHON=.venv/bin/python bash slurm/smoke.sh
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
eval "$("$HERE/cluster.sh" env)"
WORK=$(mktemp -d /tmp/dhm-slurm-smoke.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

ok() { printf 'ok   %s\n' "$*"; }
die() { printf 'FAIL %s\n' "$*" >&2; exit 1; }

# Wait (max $2 s) until job $1 and all its array tasks have left the queue.
wait_done() {
    local i
    for ((i = 0; i < $2; i++)); do
        [[ -z $(squeue -h -j "$1" 2>/dev/null) ]] && return 0
        sleep 1
    done
    die "job $1 still queued after $2 s: $(squeue -j "$1")"
}

# sacct states of job $1 (allocations only), one per line.
states() { sacct -n -X -P -j "$1" -o State; }

# Accounting reaches the DB a moment after squeue forgets a job: wait (max
# 30 s) until every record of job $1 says COMPLETED.
wait_completed() {
    local i
    for ((i = 0; i < 30; i++)); do
        [[ $(states "$1" | sort -u) == COMPLETED ]] && return 0
        sleep 1
    done
    return 1
}

j=$(sbatch --parsable -o "$WORK/plain.out" --wrap 'hostname; sleep 1')
wait_done "$j" 60
wait_completed "$j" || die "plain job $j: $(states "$j")"
ok "plain job $j COMPLETED"

j=$(sbatch --parsable -N2 --ntasks-per-node=1 -o "$WORK/multi.out" \
    --wrap 'srun bash -c "echo \$SLURMD_NODENAME \$SLURM_PROCID"')
wait_done "$j" 60
[[ $(sort "$WORK/multi.out" | tr '\n' ' ') == "node1 0 node2 1 " ]] ||
    die "2-node job $j printed: $(cat "$WORK/multi.out")"
ok "2-node job $j ran on node1 and node2"

a=$(sbatch --parsable --array=0-2 -o /dev/null --wrap 'sleep 1')
b=$(sbatch --parsable --array=0-2 --dependency=aftercorr:"$a" \
    --kill-on-invalid-dep=yes -o "$WORK/b_%a.out" --wrap 'echo $SLURM_ARRAY_TASK_ID')
wait_done "$b" 90
wait_completed "$b" || die "array $b: $(states "$b")"
ok "array $b with aftercorr:$a COMPLETED"

# Requeue the way submitit preemption does: USR2, then scontrol requeue.
# (--wrap would run under /bin/sh, i.e. dash: write a bash script instead.)
cat >"$WORK/rq.sh" <<'SCRIPT'
#!/bin/bash
if [[ ${SLURM_RESTART_COUNT:-0} == 0 ]]; then
    # Kill the sleep too: linuxproc cannot track processes orphaned on exit.
    trap 'kill $!; scontrol requeue "$SLURM_JOB_ID"; exit 0' USR2
    echo started
    sleep 300 &
    wait
fi
echo "run ${SLURM_RESTART_COUNT:-0}"
SCRIPT
j=$(sbatch --parsable --requeue -o "$WORK/rq.out" --open-mode=append "$WORK/rq.sh")
for ((i = 0; i < 60; i++)); do
    [[ -s $WORK/rq.out ]] && break
    sleep 1
done
scancel --signal=USR2 --batch "$j"
wait_done "$j" 90
if ! wait_completed "$j" || [[ $(cat "$WORK/rq.out") != *"run 1"* ]]; then
    die "requeue job $j: $(states "$j") / $(cat "$WORK/rq.out")"
fi
ok "job $j requeued after USR2 and COMPLETED"

PYTHON=${PYTHON:-python3}
if "$PYTHON" -c 'import submitit' 2>/dev/null; then
    "$PYTHON" - "$WORK/submitit" <<'EOF' || die "submitit job"
import sys, time, submitit
ex = submitit.AutoExecutor(folder=sys.argv[1] + "/%j")
ex.update_parameters(slurm_partition="debug", timeout_min=5)
job = ex.submit(pow, 2, 10)
assert job.result() == 1024, job.result()
for _ in range(30):  # submitit's sacct cache can lag a moment
    if job.state == "COMPLETED":
        break
    time.sleep(1)
assert job.state == "COMPLETED", job.state
print(f"ok   submitit job {job.job_id} returned 1024, state COMPLETED")
EOF
else
    echo "skip submitit ($PYTHON has no submitit)"
fi
echo "smoke test passed"
