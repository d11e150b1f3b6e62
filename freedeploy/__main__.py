"""``python -m freedeploy`` (and ``torchrun ... -m freedeploy train``)."""

from freedeploy.cli import main

main()
