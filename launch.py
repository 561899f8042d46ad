"""Entry point: compose the Hydra config from configs/ and hand it to hpc.launcher.

python launch.py                                  # the offline demo
python launch.py model=resnet data=cifar10 ...    # any group option or key=value override
"""

import sys

from hpc.launcher import cli

if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
