"""The trainer: `python -m pose_megatron.train` (train/__main__.py).

- config.py     TrainingConfig, DataConfig, ParallelConfig and TrainingRun (everything a run is built from)
- flags.py      command-line flags generated from dataclass fields and their docstrings
- arguments.py  the parser: flags -> a validated TrainingRun, before any process group exists
- build.py      model, optimizer, scheduler, checkpoint, data and reporter for a TrainingRun
- step.py       one training step / validation pass through megatron-core's pipeline schedules
- loop.py       run_training: build, then step, validate and save
- progress.py   log lines, progress bar, TensorBoard scalars, --metrics-file
"""
