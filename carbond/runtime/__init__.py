"""How the parts run: one start/stop lifecycle, state files, systemd notification."""
