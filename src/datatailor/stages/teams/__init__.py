"""TeaMs-RL (Gu et al., arXiv 2403.08694): a policy trained with TRPO chooses which Evol-Instruct operation to apply
next; a reviewer's judgement that a rewrite is "Not Equal" to its source is the reward.

* `env`     the environment's logic: the action decoding, one rewrite + one review through the engine, the
            observation (the paper's one-hot of the last operation, or an embedding of the instruction).
* `vec`     the vector environment that steps its environments' model calls together, and the single Gymnasium
            environment (the `rl` extra: gymnasium, stable-baselines3, sb3-contrib).
* `stages`  `teams.train` (TRPO with sb3-contrib, checkpoints and resume; see train/rl.py) and `teams.generate`
            (evolve seeds with the policy or the official schedule, WizardLM's elimination checks, fresh expert answers).
* `options` the policy options a user chooses (shared by `teams.train`'s config and train/rl.py, so neither imports
            the other at module level).
* `data`    the `teams_rl` record namespace.

The run's report: `report/teams.py` (training curve, action distributions, query accounting).
"""

from datatailor.stages.teams.data import TeamsData
from datatailor.stages.teams.env import EPISODE_LENGTH, OPERATIONS, EvolCore, Observer, bias_vector, decode_action
from datatailor.stages.teams.stages import Generate, Train

__all__ = [
    "EPISODE_LENGTH", "OPERATIONS", "EvolCore", "Generate", "Observer", "TeamsData",
    "Train", "bias_vector", "decode_action",
]
