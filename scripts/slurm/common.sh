# Sourced by the batch scripts: paths and the container/venv to run in.
# Override any of these in the environment before sbatch.
ALIGNER_DIR=${ALIGNER_DIR:-$SLURM_SUBMIT_DIR}
PYTHON=${PYTHON:-$ALIGNER_DIR/.venv/bin/python}
RESULTS=${RESULTS:-$ALIGNER_DIR/results}
# With a container: export CONTAINER=/path/aligner.sqsh and srun gets --container-image
SRUN_CONTAINER=${CONTAINER:+--container-image=$CONTAINER --container-mounts=$ALIGNER_DIR:$ALIGNER_DIR}
# One rendezvous port per job; every task computes the same one.
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$((15000 + SLURM_JOB_ID % 20000))
