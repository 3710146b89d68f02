# Sourced by deploy/slurm/*.sbatch: find the run directory, its Redis and its learner.
# Jobs meet through files in <run dir>/slurm/ (the run directory must be on storage every node sees):
#   redis.job   the id of the Redis job launch.sh submitted (absent when the run uses an outside Redis)
#   redis.url   written by redis.sbatch once Redis answers (no password in it)
#   redis.password  the Redis password (0600), written by redis.sbatch; components read it (broker.password_file)
#   learner.host written by learner.sbatch when it starts; actors connect to its weight-sync store there
#   learner.done written when the learner finished (exit 0); the Redis job then shuts down
set -euo pipefail

read -ra OPD_CMD <<< "${OPD:-opd}"  # how to run opd here, e.g. OPD="python3 -m opd" or a container wrapper
RUN_CONFIG=${1:?usage: sbatch $0 RUN_CONFIG [overrides...]  (RUN_CONFIG: runs/<id>/config.yaml, from launch.sh)}
shift
RUN_DIR=$(cd "$(dirname "$RUN_CONFIG")" && pwd)
RUN_CONFIG=$RUN_DIR/$(basename "$RUN_CONFIG")
STATE=$RUN_DIR/slurm
mkdir -p "$STATE" "$RUN_DIR/logs"
WAIT_S=${OPD_SLURM_WAIT_S:-900}
PASSWORD_FILE=$STATE/redis.password
INDEX=${OPD_INDEX:-${SLURM_JOB_ID:-0}}  # unique per job and array task; kept when Slurm requeues the job

wait_for_file() {  # PATH WHAT: wait until PATH is non-empty
    local waited=0
    until [ -s "$1" ]; do
        if [ "$waited" -ge "$WAIT_S" ]; then
            echo "opd: gave up after ${WAIT_S}s waiting for $2 ($1)" >&2
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
}

write_atomic() {  # PATH TEXT: a reader never sees half a file
    printf '%s\n' "$2" > "$1.tmp.$$"
    mv "$1.tmp.$$" "$1"
}

write_secret() {  # PATH TEXT: like write_atomic, readable by this user only from the start (printf is a builtin:
    (umask 077; write_atomic "$1" "$2")  # the text never appears on a command line)
}

BROKER_OVERRIDES=()
find_broker() {  # the Redis that redis.sbatch started, else broker.url from the config (learner, actor, scorer)
    if [ -e "$STATE/redis.job" ]; then
        wait_for_file "$STATE/redis.url" "the run's Redis (job $(cat "$STATE/redis.job"))"
        # the password goes by file: a command line is readable by every user of the node (ps)
        BROKER_OVERRIDES=("broker.url=$(cat "$STATE/redis.url")" "broker.password_file=$PASSWORD_FILE")
    fi
}
