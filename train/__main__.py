"""``python -m train`` / ``torchrun ... -m train``: see train.cli."""

from train.cli import main

raise SystemExit(main())
