"""
Entry point of the torchrun tests (tests/test_distributed.py), also usable by hand:

    torchrun --nproc_per_node=2 tests/torchrun_entry.py rl|mopd --preset=tiny ...

It runs train_teacher_rl.py or train_mopd.py unchanged, with two test-only switches:
- REWARD_BY_LENGTH=1: the toy reward becomes the parity of the response's length, a reward the
  tiny untrained S0 can earn, so that RL's updates are not zero.
- KILL_AFTER_STEP=k: rank KILL_RANK (default 1) dies with os._exit right after the checkpoint
  of step k is complete, like a preempted node; torchrun then stops the other ranks.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import config  # noqa: E402
import distributed  # noqa: E402
import tasks  # noqa: E402
import checkpoint  # noqa: E402

script = {"rl": "train_teacher_rl", "mopd": "train_mopd"}[sys.argv.pop(1)]
if os.environ.get("REWARD_BY_LENGTH"):
    tasks.toy_reward = lambda response, ex: float(len(response) % 2)
if os.environ.get("KILL_AFTER_STEP"):
    kill_step, kill_rank = int(os.environ["KILL_AFTER_STEP"]), int(os.environ.get("KILL_RANK", "1"))
    save = checkpoint.save_checkpoint

    def save_then_die(path, model, tokenizer_dir, state, opt=None):
        save(path, model, tokenizer_dir, state, opt)
        if state["step"] == kill_step and distributed.world()[0] == kill_rank:
            os._exit(9)
    checkpoint.save_checkpoint = save_then_die

main = __import__(script).main
config.cli(main)
