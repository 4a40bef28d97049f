"""``python -m resfast.train`` / ``torchrun --nproc_per_node=N -m resfast.train``."""
from resfast.train.cli import main

raise SystemExit(main())
