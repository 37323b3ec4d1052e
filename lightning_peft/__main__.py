"""``python -m lightning_peft``: the ``lightning-peft`` command (:mod:`lightning_peft.cli`)."""

from lightning_peft.cli import main

if __name__ == "__main__":
    main()
