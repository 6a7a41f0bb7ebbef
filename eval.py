"""Evaluate a registration model on the test pairs: ``python eval.py -c configs/X.yaml``.

Prints the metric table and writes pairs.csv and summary.md; ``--ckpt_path`` evaluates
fine-tuned weights, ``--print_config`` shows the resolved config.
"""

from models.cli import EvalCLI

if __name__ == "__main__":
    EvalCLI()
