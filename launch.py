"""Entry point: Hydra's command line over configs/, handed to hpc.launcher (see hpc/cli.py).

python launch.py                                      # the offline demo (sweep=demo, local)
python launch.py sweep=alpha_beta cluster=slurm       # the thesis study on a Slurm cluster
python launch.py -m model.beta=0.1,1 train.seed=range(3)   # Hydra multirun -> sweep axes
python launch.py --help                               # config groups and their options
"""

import sys

from hpc.cli import cli

if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
