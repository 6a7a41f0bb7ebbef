"""``python -m voxelopt.cli``: the ``voxelopt`` console script."""

from voxelopt.cli import console

if __name__ == "__main__":
    console()
