"""Stage 3: reinforcement learning against the reward, with a KL penalty to the starting policy
(PPO with GAE and a critic, PPO-ptx).

    inputs.py       the models, prompts and demonstrations the stage starts from; the prompt stream
    roles.py        every actor of the stage, their start, replacement and the weight sync
    rollout.py      the rollout stream: chunks generated, scored, valued and joined by actors
    iteration.py    one iteration: generate, score and join, train, sync
    state.py        the driver's state between iterations (what a checkpoint saves)
    checkpoints.py  checkpoints, written whole or not at all
    evaluation.py   the held-out evaluation, the alignment tax, the samples table
    recovery.py     the one recovery of every phase from a role's death or hang
    loop.py         the stage: roles, evaluations, the iterations, checkpoints, the figures
"""

from trainers.rl.checkpoints import CheckpointExists
from trainers.rl.inputs import RLInputs, prepare
from trainers.rl.iteration import NonFiniteError
from trainers.rl.loop import train

__all__ = ["CheckpointExists", "NonFiniteError", "RLInputs", "prepare", "train"]
