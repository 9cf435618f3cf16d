#!/usr/bin/env python
"""Entry point from a checkout: `python data_prep.py simulate|show|pastis|mtlcc|info …`."""
import sys

from sitskit.data_prep.cli import main

if __name__ == "__main__":
    sys.exit(main())
