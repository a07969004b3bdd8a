"""The commands of `carbond`: run, check, report, top, exec, intensity."""
