"""Accelerator-shaped model pieces shared by the exporter and the torch-free runtime (numpy only)."""
