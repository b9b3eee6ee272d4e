"""Runs every pending experiment in experiment_configs/ (to be built: issue 5)."""

import sys

if __name__ == "__main__":
    sys.exit("scheduler.py: error: not built yet; experiment sweeps arrive with issue 5")
