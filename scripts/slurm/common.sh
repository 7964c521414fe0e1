# Sourced by the batch scripts. sbatch runs a *copy* of the batch script from slurmd's spool
# directory, so the scripts find this file (and everything else) through ALIGNER_DIR, which
# defaults to the directory sbatch was called from. Override any of these in the environment
# before sbatch (sbatch exports the submitting shell's environment to the job):
#   ALIGNER_DIR  the aligner checkout, visible on every node     (default: $SLURM_SUBMIT_DIR)
#   RESULTS      where runs, checkpoints and the critic's ready file go (default: $ALIGNER_DIR/results)
#   CONTAINER    an image for pyxis/enroot (e.g. aligner.sqsh); srun then gets --container-image
#   PYTHON       the interpreter (default: $ALIGNER_VENV/bin/python, ALIGNER_VENV defaulting to
#                $ALIGNER_DIR/.venv; `python` inside a CONTAINER)
ALIGNER_DIR=${ALIGNER_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
RESULTS=${RESULTS:-$ALIGNER_DIR/results}
if [ -n "${CONTAINER:-}" ]; then
  PYTHON=${PYTHON:-python}
else
  PYTHON=${PYTHON:-${ALIGNER_VENV:-$ALIGNER_DIR/.venv}/bin/python}
fi
mkdir -p "$RESULTS"
# The checkout's aligner package wins over a copy installed in the image or venv.
export PYTHONPATH=$ALIGNER_DIR${PYTHONPATH:+:$PYTHONPATH}

# Flags for every srun: one failed task ends the step at once (instead of leaving the other
# ranks waiting in a collective until the time limit), no CPU binding (PyTorch threads).
SRUN_ARGS=(--kill-on-bad-exit=1 --cpu-bind=none)
if [ -n "${CONTAINER:-}" ]; then
  MOUNTS=$ALIGNER_DIR:$ALIGNER_DIR
  case "$RESULTS/" in "$ALIGNER_DIR"/*) ;; *) MOUNTS=$MOUNTS,$RESULTS:$RESULTS ;; esac
  SRUN_ARGS+=(--container-image="$CONTAINER" --container-mounts="${CONTAINER_MOUNTS:-$MOUNTS}" --container-workdir="$ALIGNER_DIR")
fi

# torch.distributed rendezvous on the job's first node. The port is derived from the job id
# (as aligner/distributed/launch_env.py default_port_for_job): below Linux's ephemeral range
# (32768+) and 8 apart per job, so jobs sharing a node never meet, and a job may use port+1, +2.
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + (SLURM_JOB_ID % 1500) * 8))}

# trainer.devices / trainer.num_nodes as the allocation has them (aligner checks them against
# the world size srun starts).
TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-$((SLURM_NTASKS / SLURM_JOB_NUM_NODES))}
