"""Train (fine-tune) a registration model: ``python train.py fit -c configs/finetune_heads.yaml``.

Subcommands fit / validate / test / predict; ``--print_config`` shows the resolved config.
"""

from models.cli import RegistrationCLI

if __name__ == "__main__":
    RegistrationCLI()
