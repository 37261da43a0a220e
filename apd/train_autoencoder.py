"""Trains a mask-aware latent autoencoder (`config.task = 'autoencoder'`).

    python -m apd.train_autoencoder --config=experiments/clipart_autoencoder.py[:ARGS] \
        --workdir=DIR [--config.KEY=VALUE ...] [--verbose]

The flags, resuming, preemption saves, one-line errors and exit codes are apd.train's (the same
`main`, `apd.train.main`); only the task differs. A config of another task (a diffusion config)
is refused in one line naming its binary.
"""

import functools

from apd import cli, train

PROGRAM = train.PROGRAMS["autoencoder"]

if __name__ == "__main__":
    cli.run(
        functools.partial(train.main, task="autoencoder"),
        PROGRAM,
        flags_parser=functools.partial(train.parse_flags, program=PROGRAM),
    )
