"""One rank of a CPU (gloo) DDP training, started by tests/test_train.py with RANK etc. set.

argv: run_dir, JSON of dotted overrides, output folder for this rank's final weights.
DHM_TEST_FLOAT64=1 trains in float64 (torch's default dtype), for bitwise-bounded comparisons.
"""

import json
import os
import sys

import torch

if os.environ.get("DHM_TEST_FLOAT64"):
    torch.set_default_dtype(torch.float64)  # the whole run in float64, through the same code

from dhm.training.train import run_training
from tests.helpers.configs import small_config

run_dir, overrides, out_dir = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
path, model = run_training(small_config(run_dir, **overrides))
torch.save(model.state_dict(), os.path.join(out_dir, f"rank{os.environ['RANK']}.pt"))
