"""Sweeps: `get_hyper` declarations (`hyper`), their runs checked against the config (`plan`),
the table over training seeds (`table`) and the plots (`plots`). The binary is `apd.sweep`."""
