#!/usr/bin/env python
"""Entry point from a checkout: `accelerate launch finetune.py --config <preset> [--key value …]`, or
`python finetune.py evaluate|predict|sweep …`."""
import sys

from sitskit.finetune.main_finetune import main

if __name__ == "__main__":
    sys.exit(main())
