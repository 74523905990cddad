"""Command line: `ondevice-llama export | chat`."""
