"""Reading runs back: history checker, report, sweeps, exporters."""
