"""One rank of a CPU (gloo) DDP training, started by tests/test_train.py with RANK etc. set.

argv: run_dir, JSON of dotted overrides, output folder for this rank's final weights.
DHM_TEST_FLOAT64=1 trains in float64 (torch's default dtype), for bitwise-bounded comparisons.
It also writes rank<r>.json: the process group's backend and collective timeout, the device the
model trained on and CUDA_VISIBLE_DEVICES, as training left them.
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
rank = os.environ["RANK"]
torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
dist = torch.distributed
pg = dist.distributed_c10d._get_default_group() if dist.is_initialized() else None
device = next(model.parameters()).device
record = {
    "backend": dist.get_backend() if pg else None,
    "timeout_s": pg._get_backend(device).options._timeout.total_seconds() if pg else None,
    "device": str(device),
    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
}
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(record, f)
