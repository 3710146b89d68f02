"""The roof: the `opd` CLI, launchers, cluster helpers, scaling, dead-letter commands, `opd top`. Only the entry point imports it."""
