"""What every component process shares at run time: lifecycle and stop flag, reporter, metrics export, tracking."""
