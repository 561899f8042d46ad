#!/usr/bin/env bash
# Local two-node Slurm test cluster on this single machine.
#
#   slurm/cluster.sh up       install (if needed) and start everything; idempotent
#   slurm/cluster.sh down     stop the daemons this script started
#   slurm/cluster.sh status   show sinfo and daemon liveness; exit 0 iff up
#   slurm/cluster.sh env      print `export SLURM_CONF=...` for eval
#
# It runs munged, MariaDB, slurmdbd, slurmctld and two slurmd (node1, node2)
# directly (no systemd here). All Slurm config, logs, pid files and spool
# live under $DHM_SLURM_STATE (default /var/lib/dhm-slurm); see README.md.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE=${DHM_SLURM_STATE:-/var/lib/dhm-slurm}
ETC=$STATE/etc
LOG=$STATE/log
RUN=$STATE/run
SPOOL=$STATE/spool
# Every Slurm client and daemon reads its config from here, not /etc/slurm.
export SLURM_CONF=$ETC/slurm.conf
# Daemons live in sbin, which a stripped CI environment may not have on PATH.
export PATH=$PATH:/usr/sbin:/sbin

CLUSTER=dhm
ACCOUNT=dhm
SLURM_USER=slurm
NODES=(node1 node2)
# Local, loopback-only test database: a fixed password is fine.
DB_PASS=dhm-slurm-test
WAIT_S=${DHM_SLURM_WAIT:-90}
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)

log() { printf '[cluster.sh %3ds] %s\n' "$SECONDS" "$*" >&2; }

# Print the last lines of the given logs, then exit non-zero, so a failing
# CI run shows why a daemon did not come up.
fail() {
    local msg=$1
    shift
    printf '[cluster.sh] ERROR: %s\n' "$msg" >&2
    local f
    for f in "$@"; do
        if [[ -r $f ]]; then
            printf -- '----- tail of %s -----\n' "$f" >&2
            # Drop the harmless PMIx-not-installed noise every daemon logs.
            grep -Ev 'pmix|MPI: Cannot create context' "$f" | tail -n 30 >&2 || true
        fi
    done
    exit 1
}

# True if the pid in file $1 names a live process.
pid_alive() {
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

# Poll command "$@" every second for up to $WAIT_S seconds.
wait_for() {
    local deadline=$((SECONDS + WAIT_S))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 1
    done
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
mariadb_ok() { mariadb-admin --silent ping >/dev/null 2>&1; }
dbd_ok() { sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1; }
ctld_ok() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
sacct_ok() { sacct -n -X -S now-1minutes >/dev/null 2>&1; }

# Both nodes registered and usable (idle, or busy with jobs after a restart).
nodes_ok() {
    local states
    states=$(sinfo -h -N -p debug -o '%N %T' 2>/dev/null) || return 1
    local n
    for n in "${NODES[@]}"; do
        grep -Eq "^$n (idle|mixed|allocated|completing)\$" <<<"$states" || return 1
    done
}

# Both nodes offer the two fake GPUs of gres.conf.
gpus_ok() {
    [[ $(sinfo -h -N -p debug -o '%N %G' 2>/dev/null | sort -u) == $'node1 gpu:2\nnode2 gpu:2' ]]
}

# The running controller has this version's settings (GRES above; job comments kept).
config_current() {
    local config
    config=$(scontrol show config 2>/dev/null) || return 1  # (grep -q under pipefail: SIGPIPE)
    gpus_ok && grep -Eq '^AccountingStoreFlags += job_comment' <<<"$config"
}

# Fully up: every daemon alive and Slurm answering, including accounting.
is_up() {
    [[ -r $SLURM_CONF ]] || return 1
    command -v slurmctld >/dev/null 2>&1 || return 1
    munge_ok && mariadb_ok || return 1
    pid_alive "$RUN/slurmdbd.pid" && pid_alive "$RUN/slurmctld.pid" || return 1
    local n
    for n in "${NODES[@]}"; do pid_alive "$RUN/slurmd-$n.pid" || return 1; done
    nodes_ok && sacct_ok
}

install_packages() {
    local missing=0 cmd
    for cmd in slurmctld slurmd slurmdbd sbatch sacct munged mariadbd; do
        command -v "$cmd" >/dev/null 2>&1 || missing=1
    done
    ((missing)) || return 0
    log "installing ${PACKAGES[*]} (apt)"
    # Package postinst scripts would try to start the daemons with Debian's
    # default configs; a policy-rc.d that answers 101 forbids that. Most
    # container images ship one already; otherwise add one just for this.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        made_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    local rc=0
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${PACKAGES[@]}"; } >"$LOG/apt.log" 2>&1 || rc=$?
    ((made_policy)) && rm -f "$policy"
    ((rc == 0)) || fail "apt-get install failed (rc=$rc)" "$LOG/apt.log"
    log "packages installed"
}

# Multi-node jobs resolve node names (srun, SLURM_NODELIST consumers), and
# the nodes only exist as names in slurm.conf: map them to loopback once.
ensure_hosts() {
    if ! grep -q '# dhm-slurm' /etc/hosts; then
        printf '127.0.0.1 %s  # dhm-slurm test nodes\n' "${NODES[*]}" >>/etc/hosts
    fi
    local host
    host=$(hostname)
    if ! getent hosts "$host" >/dev/null; then
        printf '127.0.0.1 %s  # dhm-slurm hostname\n' "$host" >>/etc/hosts
    fi
}

# Render template $1 to $2; replace $2 only when the content changed.
render() {
    local tmp
    tmp=$(mktemp "$2.XXXXXX")
    sed -e "s|@HOST@|$(hostname)|g" -e "s|@STATE@|$STATE|g" \
        -e "s|@SLURM_USER@|$SLURM_USER|g" -e "s|@DB_PASS@|$DB_PASS|g" \
        "$1" >"$tmp"
    if cmp -s "$tmp" "$2"; then rm -f "$tmp"; else mv -f "$tmp" "$2"; fi
}

write_config() {
    id "$SLURM_USER" >/dev/null 2>&1 || fail "user $SLURM_USER missing (package install broken?)"
    # The slurm user must be able to traverse the state dir.
    mkdir -p "$ETC" "$LOG" "$RUN" "$SPOOL/slurmctld"
    chmod 755 "$STATE" "$ETC"
    local n
    for n in "${NODES[@]}"; do mkdir -p "$SPOOL/slurmd-$n"; done
    # slurmctld and slurmdbd drop to SlurmUser before writing state, logs
    # and pid files.
    chown "$SLURM_USER:$SLURM_USER" "$LOG" "$RUN" "$SPOOL/slurmctld"
    render "$HERE/slurm.conf.in" "$ETC/slurm.conf"
    chmod 644 "$ETC/slurm.conf"
    render "$HERE/gres.conf.in" "$ETC/gres.conf"
    chmod 644 "$ETC/gres.conf"
    make_gpu_devices
    render "$HERE/slurmdbd.conf.in" "$ETC/slurmdbd.conf"
    # slurmdbd refuses a config (it holds the DB password) that is not
    # private to SlurmUser.
    chown "$SLURM_USER:$SLURM_USER" "$ETC/slurmdbd.conf"
    chmod 600 "$ETC/slurmdbd.conf"
    # No cgroup.conf: proctrack/linuxproc + task/none load no cgroup plugin.
}

# The fake GPUs of gres.conf: character devices with /dev/null's numbers, so slurmd finds a
# device file where it looks and nothing can use it as a GPU.
make_gpu_devices() {
    local n i dev
    for n in "${NODES[@]}"; do
        mkdir -p "$STATE/dev/$n"
        for i in 0 1; do
            dev=$STATE/dev/$n/gpu$i
            [[ -c $dev ]] || mknod -m 666 "$dev" c 1 3 || fail "mknod $dev failed"
        done
    done
}

start_munge() {
    munge_ok && { log "munged already running"; return 0; }
    id munge >/dev/null 2>&1 || fail "user munge missing"
    # Without systemd nobody creates the tmpfs run dir; munged also insists
    # that its key and dirs belong to the munge user.
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /etc/munge /var/lib/munge /var/log/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    log "starting munged"
    runuser -u munge -- munged >/dev/null 2>&1 ||
        fail "munged did not start" /var/log/munge/munged.log
    wait_for munge_ok || fail "munge does not answer" /var/log/munge/munged.log
    # Remember that we started it, so `down` stops it and nothing else.
    cp /run/munge/munged.pid "$RUN/munged.pid" 2>/dev/null || pgrep -xo munged >"$RUN/munged.pid"
}

start_mariadb() {
    if mariadb_ok; then
        log "mariadb already running"
    else
        id mysql >/dev/null 2>&1 || fail "user mysql missing"
        if [[ ! -d /var/lib/mysql/mysql ]]; then
            log "initialising mariadb data dir"
            mariadb-install-db --user=mysql --datadir=/var/lib/mysql \
                --skip-test-db >"$LOG/mariadb-install.log" 2>&1 ||
                fail "mariadb-install-db failed" "$LOG/mariadb-install.log"
        fi
        install -d -o mysql -g mysql -m 755 /run/mysqld
        touch "$LOG/mariadb.log"
        chown mysql:mysql "$LOG/mariadb.log"
        log "starting mariadb"
        # mariadbd does not daemonize: detach it and keep its pid ourselves.
        # innodb_* values are what slurmdbd checks for (it logs an error
        # otherwise).
        setsid mariadbd --user=mysql --log-error="$LOG/mariadb.log" \
            --innodb-lock-wait-timeout=900 --innodb-buffer-pool-size=256M \
            </dev/null >>"$LOG/mariadb.log" 2>&1 &
        echo $! >"$RUN/mariadb.pid"
        wait_for mariadb_ok || fail "mariadb does not answer" "$LOG/mariadb.log"
    fi
    # Idempotent: safe on every `up`, also when the DB already exists.
    mariadb -u root <<SQL || fail "creating slurm_acct_db failed" "$LOG/mariadb.log"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
}

start_slurmdbd() {
    if pid_alive "$RUN/slurmdbd.pid"; then
        log "slurmdbd already running"
    else
        log "starting slurmdbd"
        slurmdbd >>"$LOG/slurmdbd.log" 2>&1 || fail "slurmdbd did not start" "$LOG/slurmdbd.log"
    fi
    wait_for dbd_ok || fail "slurmdbd does not answer" "$LOG/slurmdbd.log"
}

# Cluster, account and user must exist in accounting before slurmctld
# registers; sacctmgr -i answers no questions.
register_accounting() {
    if [[ -z $(sacctmgr -n -P list cluster "$CLUSTER" format=cluster) ]]; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
    if [[ -z $(sacctmgr -n -P list account "$ACCOUNT" format=account) ]]; then
        sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" \
            Description="DHM tests" Organization=dhm >/dev/null
    fi
    local u
    for u in root ${SUDO_USER:-}; do
        if [[ -z $(sacctmgr -n -P list assoc user="$u" account="$ACCOUNT" format=user) ]]; then
            sacctmgr -i add user "$u" Account="$ACCOUNT" Cluster="$CLUSTER" >/dev/null
        fi
    done
}

start_slurmctld() {
    if pid_alive "$RUN/slurmctld.pid"; then
        log "slurmctld already running"
    else
        log "starting slurmctld"
        # No -c: keeping the saved state keeps job ids growing across
        # restarts, so they never collide with old records in the DB.
        slurmctld >>"$LOG/slurmctld.log" 2>&1 || fail "slurmctld did not start" "$LOG/slurmctld.log"
    fi
    wait_for ctld_ok || fail "slurmctld does not answer" "$LOG/slurmctld.log"
}

start_slurmd() {
    local n
    for n in "${NODES[@]}"; do
        if pid_alive "$RUN/slurmd-$n.pid"; then
            log "slurmd $n already running"
            continue
        fi
        log "starting slurmd $n"
        # -N: one slurmd per node name on this single host.
        slurmd -N "$n" >>"$LOG/slurmd-$n.log" 2>&1 || fail "slurmd $n did not start" "$LOG/slurmd-$n.log"
    done
}

# Like `wait_for nodes_ok`, but fail at once when a slurmd has died (e.g.
# its port is taken) instead of waiting out the whole timeout.
wait_nodes() {
    local deadline=$((SECONDS + WAIT_S)) grace=$((SECONDS + 5)) n
    until nodes_ok; do
        # A slurmd that cannot start removes its pid file and exits; give
        # it a few seconds to write the file before judging.
        for n in "${NODES[@]}"; do
            if ((SECONDS > grace)) && ! pid_alive "$RUN/slurmd-$n.pid"; then
                fail "slurmd $n exited" "$LOG/slurmd-$n.log"
            fi
        done
        ((SECONDS < deadline)) || return 1
        sleep 1
    done
}

cmd_up() {
    ((EUID == 0)) || fail "'up' must run as root"
    if is_up; then
        if config_current; then
            log "cluster already up"
            return 0
        fi
        # Started from an older slurm.conf (without the fake GPUs or job comments): GRES needs a
        # restart, not a reconfigure.
        log "cluster up with an older config: restarting"
        cmd_down
    fi
    mkdir -p "$LOG" "$RUN"
    install_packages
    ensure_hosts
    write_config
    start_munge
    start_mariadb
    start_slurmdbd
    register_accounting
    start_slurmctld
    start_slurmd
    log "waiting for node1, node2 idle and sacct (up to ${WAIT_S}s)"
    wait_nodes || {
        sinfo -N -l >&2 || true
        sinfo -R >&2 || true
        fail "nodes did not become idle" "$LOG/slurmctld.log" "$LOG/slurmd-node1.log" "$LOG/slurmd-node2.log"
    }
    wait_for sacct_ok || fail "sacct does not answer" "$LOG/slurmdbd.log"
    # A daemon can daemonize, then die (e.g. port taken by another cluster
    # that answered our checks): require our own pids alive at the end.
    is_up || fail "a daemon died during start-up" "$LOG"/slurm*.log
    log "cluster up (SLURM_CONF=$SLURM_CONF)"
}

# Stop the process in pid file $2 (named $1): TERM, then KILL after 20 s.
stop_pid() {
    local name=$1 file=$2 pid
    [[ -s $file ]] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping $name ($pid)"
        kill -TERM "$pid" 2>/dev/null || true
        local i
        for ((i = 0; i < 20; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name ignores TERM; killing"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$file"
}

cmd_down() {
    # Reverse start order: slurmctld saves state and flushes to slurmdbd,
    # which needs MariaDB and munge to still run.
    local i
    for ((i = ${#NODES[@]} - 1; i >= 0; i--)); do
        stop_pid "slurmd ${NODES[i]}" "$RUN/slurmd-${NODES[i]}.pid"
    done
    stop_pid slurmctld "$RUN/slurmctld.pid"
    stop_pid slurmdbd "$RUN/slurmdbd.pid"
    stop_pid mariadb "$RUN/mariadb.pid"
    stop_pid munged "$RUN/munged.pid"
    log "cluster down"
}

cmd_status() {
    local name file
    printf '%-14s %s\n' munged "$(munge_ok && echo running || echo stopped)"
    printf '%-14s %s\n' mariadb "$(mariadb_ok && echo running || echo stopped)"
    for name in slurmdbd slurmctld "${NODES[@]/#/slurmd-}"; do
        file=$RUN/$name.pid
        if pid_alive "$file"; then
            printf '%-14s running (pid %s)\n' "$name" "$(cat "$file")"
        else
            printf '%-14s stopped\n' "$name"
        fi
    done
    sinfo 2>/dev/null || echo "sinfo: controller not reachable"
    if is_up; then
        echo "cluster: up"
    else
        echo "cluster: down"
        return 1
    fi
}

case ${1:-} in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
env) printf 'export SLURM_CONF=%s\n' "$SLURM_CONF" ;;
*)
    echo "usage: $0 {up|down|status|env}" >&2
    exit 2
    ;;
esac
