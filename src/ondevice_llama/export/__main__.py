"""`python -m ondevice_llama.export`: the same as `ondevice-llama export`."""

import sys

from ..cli.main import main

sys.exit(main(["export", *sys.argv[1:]]))
