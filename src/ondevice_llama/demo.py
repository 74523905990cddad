"""`python -m ondevice_llama.demo`: the chat demo, the same as `ondevice-llama chat`."""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main(["chat", *sys.argv[1:]]))
