#!/usr/bin/env bash
# Submit a whole run to Slurm, one job per component: prepare (builds the models once), Redis, the learner
# (one task per rank: learner.num_ranks), actor.num_actors actors and scorer.num_scorers scorers (job arrays).
# With several teachers (a teachers: section) each teacher's scorers are their own job array, `opd-scorer-<teacher>`
# of that pool's num_scorers, run with OPD_TEACHER=<teacher>.
# Run it from the repository root:
#   deploy/slurm/launch.sh configs/redis.yaml learner.max_steps=100
# It prints the run's config.yaml; add scorers later with  sbatch deploy/slurm/scorer.sbatch <that config>
# (OPD_TEACHER=<teacher> sbatch ... for a teacher's pool).
# Env: OPD_REDIS_URL (use that Redis instead of starting a job; no password in it: OPD_REDIS_PASSWORD_FILE names a
#      file holding it), OPD (how to run opd, default `opd`),
#      OPD_PYTHON (default python3), OPD_SBATCH_ARGS (extra sbatch arguments for every job, e.g.
#      "--partition=cpu --time=2:00:00"), OPD_SBATCH_ARGS_<ROLE> for one role (LEARNER, ACTOR, SCORER, REDIS,
#      PREPARE), e.g. OPD_SBATCH_ARGS_LEARNER="--gres=gpu:1", and OPD_SBATCH_ARGS_SCORER_<TEACHER> for one
#      teacher's scorers (after OPD_SBATCH_ARGS_SCORER), e.g. OPD_SBATCH_ARGS_SCORER_ADDER="--gres=gpu:1".
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CONFIG=${1:?usage: deploy/slurm/launch.sh CONFIG [overrides...]}
shift
PY=${OPD_PYTHON:-python3}
OVERRIDES=(broker.type=redis "$@")
unset OPD_TEACHER  # set per job below (a teacher's scorers only): every job inherits this shell's environment
if [ -n "${OPD_REDIS_URL:-}" ]; then
    if [[ "$OPD_REDIS_URL" =~ ^[a-z]+://[^/@]*:[^/@]*@ ]]; then
        echo "opd: OPD_REDIS_URL holds a password, which would show on command lines; put the password in a" \
            "file (chmod 600) and set OPD_REDIS_PASSWORD_FILE to it" >&2
        exit 2
    fi
    OVERRIDES+=("broker.url=$OPD_REDIS_URL")
    if [ -n "${OPD_REDIS_PASSWORD_FILE:-}" ]; then
        PW_DIR=$(cd "$(dirname "$OPD_REDIS_PASSWORD_FILE")" && pwd)  # absolute: jobs start elsewhere
        OVERRIDES+=("broker.password_file=$PW_DIR/$(basename "$OPD_REDIS_PASSWORD_FILE")")
    fi
elif [ -n "${OPD_REDIS_TLS_CERT:-}" ]; then
    # the Redis job will speak TLS: a rediss:// URL lets broker.tls_* overrides validate (find_broker sets the real one)
    OVERRIDES+=("broker.url=rediss://redis-job.invalid:6379/0")
fi
RUN_CONFIG=$("$PY" -m opd.launch.cluster resolve "$CONFIG" "${OVERRIDES[@]}")
RUN_DIR=$(dirname "$RUN_CONFIG")
mkdir -p "$RUN_DIR/slurm" "$RUN_DIR/logs"
# line 1: actors and learner ranks; then one line per teacher's pool: its name and num_scorers (`default` for the
# one teacher of a run without a teachers: section)
{ read -r NUM_ACTORS NUM_RANKS; mapfile -t POOLS; } < <("$PY" -c 'import sys; from opd.config import load_config
c = load_config(sys.argv[1]); print(c.actor.num_actors, c.learner.num_ranks)
for name, pool in c.teacher_pools().items(): print(name, pool.scorer.num_scorers)' "$RUN_CONFIG")
[ "${#POOLS[@]}" -gt 0 ] || { echo "opd: could not read the teachers' pools of $RUN_CONFIG" >&2; exit 1; }
export OPD_SLURM_DIR=$HERE

submit() {  # ROLE SBATCH-ARGS... SCRIPT: prints the job id. ROLE scorer-<teacher>: one teacher's pool
    local role=$1
    shift
    local base=${role%%-*}
    local extra_var="OPD_SBATCH_ARGS_${base^^}" pool_var pool_args=""
    if [ "$role" != "$base" ]; then  # scorer-adder: OPD_SBATCH_ARGS_SCORER_ADDER as well
        pool_var=OPD_SBATCH_ARGS_${role^^}
        pool_var=${pool_var//-/_}
        pool_args=${!pool_var:-}
    fi
    # shellcheck disable=SC2086  # the extra arguments are meant to split
    sbatch --parsable --job-name="opd-$role" --output="$RUN_DIR/logs/slurm-$role-%j.out" \
        ${OPD_SBATCH_ARGS:-} ${!extra_var:-} $pool_args "$@" "$RUN_CONFIG"
}

prepare=$(submit prepare "$HERE/prepare.sbatch")
echo "prepare  job $prepare"
if [ -z "${OPD_REDIS_URL:-}" ]; then
    redis=$(submit redis "$HERE/redis.sbatch")
    echo "$redis" > "$RUN_DIR/slurm/redis.job"
    echo "redis    job $redis"
fi
after=--dependency=afterok:$prepare
# one task per learner rank (OPD_SBATCH_ARGS_LEARNER="--nodes=2" spreads them; "--gres=gpu:4" gives GPUs)
echo "learner  job $(submit learner "$after" --ntasks="$NUM_RANKS" "$HERE/learner.sbatch")"
echo "actors   job $(submit actor "$after" --array=0-$((NUM_ACTORS - 1)) "$HERE/actor.sbatch")"
for line in "${POOLS[@]}"; do
    read -r teacher num <<< "$line"
    if [ "$num" -lt 1 ]; then
        echo "scorers of teacher $teacher: none (num_scorers 0); add them with the command below"
    elif [ "$teacher" = default ]; then  # a run with one teacher: as it always was
        echo "scorers  job $(submit scorer "$after" --array=0-$((num - 1)) "$HERE/scorer.sbatch")"
    else  # each teacher's scorers are their own array; scorer.sbatch passes --teacher "$OPD_TEACHER" on
        echo "scorers-$teacher job $(OPD_TEACHER=$teacher submit "scorer-$teacher" "$after" \
            --array=0-$((num - 1)) "$HERE/scorer.sbatch")"
    fi
done
echo "run config: $RUN_CONFIG"
for line in "${POOLS[@]}"; do
    read -r teacher _ <<< "$line"
    if [ "$teacher" = default ]; then
        echo "add a scorer: sbatch -o $RUN_DIR/logs/slurm-scorer-%j.out deploy/slurm/scorer.sbatch $RUN_CONFIG"
    else
        echo "add a scorer of teacher $teacher: OPD_TEACHER=$teacher sbatch --job-name=opd-scorer-$teacher" \
            "-o $RUN_DIR/logs/slurm-scorer-$teacher-%j.out deploy/slurm/scorer.sbatch $RUN_CONFIG"
    fi
done
