#!/usr/bin/env python
"""Entry point from a checkout: `accelerate launch finetune.py …` (fine-tuning stage; not built yet)."""
import sys

if __name__ == "__main__":
    sys.exit("finetune.py: the fine-tuning stage is not implemented yet (see docs/architecture.md).")
