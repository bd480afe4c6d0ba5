#!/bin/bash
# A SLURM job for model/finetune_dolly.py on 2 nodes x 8 GPUs, requeued when preempted or out of time; see README.md
# "Several GPUs and nodes". Submit from the repository root: sbatch docs/slurm_job.sh
#SBATCH --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --time=04:00:00
#SBATCH --requeue --open-mode=append --output=slurm-%j.out
#SBATCH --signal=B:TERM@300          # SIGTERM to this script 5 min before the time limit
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
trap 'STOPPING=1; kill -TERM $PID' TERM   # srun passes it to torchrun, torchrun to the workers
srun --kill-on-bad-exit=1 torchrun --nnodes=$SLURM_NNODES --nproc_per_node=8 --shutdown_timeout=300 \
    --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 --rdzv_id=$SLURM_JOB_ID \
    model/finetune_dolly.py --auto_resume --log_dir /shared/dolly_ft --data_dir /shared/dolly15k &
PID=$!
wait $PID; rc=$?
if [ -n "$STOPPING" ]; then wait $PID; rc=75; fi       # the trap cut the first wait short: wait for the save
if [ $rc -eq 75 ]; then scontrol requeue $SLURM_JOB_ID; fi  # checkpoint saved: run again, --auto_resume continues
exit $rc
