#!/usr/bin/env python
"""Entry point from a checkout: `accelerate launch pretrain.py --config configs/<preset>.yaml [--key value …]`."""
import sys

from sitskit.pretrain.main_pretrain import main

if __name__ == "__main__":
    sys.exit(main())
