"""Running a run: launcher, site groups, processes, supervision, faults, progress, summary."""
