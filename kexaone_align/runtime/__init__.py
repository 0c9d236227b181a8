"""Ray + DeepSpeed plumbing: learners (``learner``), placement (``cluster``), LR schedules,
token-budget micro-batching (``batching``), atomic checkpoints (``checkpoint``) and rollout workers.

Submodules are imported explicitly (``from kexaone_align.runtime.learner import Learner``) so that
importing the package never pulls in Ray or DeepSpeed.
"""
