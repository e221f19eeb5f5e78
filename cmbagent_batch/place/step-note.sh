# Run by sh on each rank of a task's job step, before the task's program ($CMBAGENT_LAUNCH inside a Slurm
# allocation; see cmbagent_batch/place/launch.py): the step's rank 0 appends the step's id to the task's
# logs/slurm-steps, which the runner reads as the task ends; then every rank becomes the program.
if [ "${SLURM_PROCID:-}" = 0 ] && [ -n "${CMBAGENT_TASK_DIR:-}" ]; then
    echo "$SLURM_JOB_ID.$SLURM_STEP_ID" >> "$CMBAGENT_TASK_DIR/logs/slurm-steps" ||
        echo "cmbagent-batch: warning: cannot note job step $SLURM_JOB_ID.$SLURM_STEP_ID in $CMBAGENT_TASK_DIR/logs/slurm-steps: the task's record will not name it" >&2
fi
exec "$@"
